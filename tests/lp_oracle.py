import numpy as np
from scipy.optimize import linprog
def paper_lp(x, eps, a, b, lo, hi, w=None, per_entry=False):
    """max sum_i w_i sum_k [s_ik (a_k x_i + b_k) - a_k q_ik], vars s (N*K), q (N*K), t (N*K)>=|q|."""
    N=len(x); K=len(a); w=np.full(N,1/N) if w is None else w
    nv=3*N*K
    S=lambda i,k: i*K+k; Q=lambda i,k: N*K+i*K+k; T=lambda i,k: 2*N*K+i*K+k
    c=np.zeros(nv)
    for i in range(N):
        for k in range(K):
            c[S(i,k)]=-w[i]*(a[k]*x[i]+b[k]); c[Q(i,k)]=w[i]*a[k]
    Aub=[];bub=[]
    Aeq=[];beq=[]
    for i in range(N):
        r=np.zeros(nv)
        for k in range(K): r[S(i,k)]=1
        Aeq.append(r); beq.append(1)
        for k in range(K):
            r=np.zeros(nv); r[Q(i,k)]=1; r[T(i,k)]=-1; Aub.append(r); bub.append(0)
            r=np.zeros(nv); r[Q(i,k)]=-1; r[T(i,k)]=-1; Aub.append(r); bub.append(0)
            # s(x-hi) <= q <= s(x-lo)
            r=np.zeros(nv); r[Q(i,k)]=1; r[S(i,k)]=-(x[i]-lo); Aub.append(r); bub.append(0)
            r=np.zeros(nv); r[Q(i,k)]=-1; r[S(i,k)]=(x[i]-hi); Aub.append(r); bub.append(0)
    r=np.zeros(nv)
    for i in range(N):
        for k in range(K): r[T(i,k)]=w[i]
    Aub.append(r); bub.append(eps)
    bounds=[(0,None)]*(N*K)+[(-eps,eps) if per_entry else (None,None)]*(N*K)+[(0,None)]*(N*K)
    res=linprog(c,A_ub=np.array(Aub),b_ub=bub,A_eq=np.array(Aeq),b_eq=beq,bounds=bounds,method="highs")
    assert res.status==0, res.message
    return -res.fun
