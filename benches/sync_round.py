#!/usr/bin/env python3
"""How much one durable round costs when it wrote N files: fdatasync each in
turn, fdatasync each from a thread pool, one syncfs, or syncfs then each
fdatasync. Run in a directory on the disk to measure:
    cd /path/on/disk && python3 benches/sync_round.py 200
(docs/ARCHITECTURE.md, the shared writer design, quotes its figures.)
"""
import os, time, threading, ctypes, sys
from concurrent.futures import ThreadPoolExecutor
N=int(sys.argv[1]) if len(sys.argv)>1 else 200
libc=ctypes.CDLL("libc.so.6", use_errno=True)
fds=[os.open(f"f{i}", os.O_CREAT|os.O_WRONLY|os.O_APPEND, 0o644) for i in range(N)]
buf=b"x"*256
def round_seq():
    for fd in fds: os.write(fd, buf)
    for fd in fds: os.fdatasync(fd)
def mk_par(k):
    ex=ThreadPoolExecutor(k)
    def r():
        for fd in fds: os.write(fd, buf)
        list(ex.map(os.fdatasync, fds))
    return r
def round_syncfs():
    for fd in fds: os.write(fd, buf)
    libc.syncfs(fds[0])
def round_syncfs_then_fdatasync():
    for fd in fds: os.write(fd, buf)
    libc.syncfs(fds[0])
    for fd in fds: os.fdatasync(fd)
for name, f in [("seq",round_seq),("par8",mk_par(8)),("par32",mk_par(32)),("syncfs",round_syncfs),("syncfs+fdatasync",round_syncfs_then_fdatasync)]:
    f()
    t=time.time(); R=10
    for _ in range(R): f()
    dt=(time.time()-t)/R
    print(f"{name:18s} {N} files: {dt*1000:7.2f} ms/round")
