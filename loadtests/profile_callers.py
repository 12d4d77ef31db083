#!/usr/bin/env python3
"""Callers of functions per request, from bench_counts --keep-pstats snapshots.

Usage: .venv/bin/python loadtests/profile_callers.py DIR/standalone-openai-json N2 PATTERN...
"""
import marshal
import sys


def load(p):
    with open(p,'rb') as f: return marshal.load(f)
base=sys.argv[1]; n=int(sys.argv[2]); pat=sys.argv[3:]
a=load(base+'.before.pstats'); b=load(base+'.pstats')
def short(k):
    fn,line,name=k
    for m in ("site-packages/","/gateway/","/lib/python3.11/"):
        i=fn.find(m)
        if i>=0: fn=fn[i+len(m):]; break
    return f"{fn}:{line}({name})"
for k,v in b.items():
    name=short(k)
    if not any(p in name for p in pat): continue
    tot=(v[1]-a.get(k,(0,0,0,0,{}))[1])/n
    if tot<0.5: continue
    print(f"{tot:7.1f} {name}")
    callers=v[4]; ac=a.get(k,(0,0,0,0,{}))[4]
    rows=[]
    for ck,cv in callers.items():
        c=cv[1] if isinstance(cv,tuple) else cv
        c0=ac.get(ck,(0,0))
        c0=c0[1] if isinstance(c0,tuple) else c0
        d=(c-c0)/n
        if d>=0.5: rows.append((d,short(ck)))
    for d,nm in sorted(rows,reverse=True)[:25]: print(f"     {d:6.1f} <- {nm}")
