"""Run inside a job: ptrace the sandbox's init (PID 1 here, bubblewrap's) and make it call
prctl(PR_SET_PDEATHSIG, 0), so it no longer dies with the outer bubblewrap (x86_64).
Not a test: tests/test_containment.py copies it into a job's directory."""

import ctypes
import os
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_PEEKTEXT, PTRACE_SINGLESTEP, PTRACE_GETREGS, PTRACE_SETREGS = 1, 9, 12, 13
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000
SYS_PRCTL, PR_SET_PDEATHSIG = 157, 1
FIELDS = ["r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
          "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
          "gs_base", "ds", "es", "fs", "gs"]


class Regs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in FIELDS]


def check(result: int, what: str) -> int:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def main(pid: int = 1) -> None:
    check(libc.ptrace(PTRACE_ATTACH, pid, None, None), "attach")
    os.waitpid(pid, WALL)
    old = Regs()
    check(libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(old)), "getregs")
    word = libc.ptrace(PTRACE_PEEKTEXT, pid, ctypes.c_void_p(old.rip - 2), None)
    if word & 0xFFFF != 0x050F:  # the init waits in wait4(): just after a `syscall`
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        sys.exit("init is not in a syscall")
    new = Regs.from_buffer_copy(old)
    new.rax, new.rdi, new.rsi = SYS_PRCTL, PR_SET_PDEATHSIG, 0
    new.rip, new.orig_rax = old.rip - 2, 2**64 - 1
    check(libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(new)), "setregs")
    check(libc.ptrace(PTRACE_SINGLESTEP, pid, None, None), "singlestep")
    os.waitpid(pid, WALL)
    after = Regs()
    libc.ptrace(PTRACE_GETREGS, pid, None, ctypes.byref(after))
    check(libc.ptrace(PTRACE_SETREGS, pid, None, ctypes.byref(old)), "restore")
    check(libc.ptrace(PTRACE_DETACH, pid, None, None), "detach")
    print("init's prctl(PR_SET_PDEATHSIG, 0) returned", ctypes.c_longlong(after.rax).value,
          flush=True)


if __name__ == "__main__":
    main()
