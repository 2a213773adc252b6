/* emu/switch_x86_64.S — the fiber context switch of the emulator (x86-64 System V).
 *
 * void patchbay_emu_switch(void** save_sp, void* load_sp)
 *   Saves the callee-saved state of the running context on its own stack, stores the stack
 *   pointer in *save_sp, loads load_sp and restores the state saved there. Everything the
 *   System V ABI makes callee-saved is kept: rbx, rbp, r12-r15, rsp, the MXCSR control bits and
 *   the x87 control word. Caller-saved registers need no saving: this is an ordinary call for
 *   the compiler. About 20 instructions, no system call (swapcontext makes one per switch).
 *
 * Frame on a suspended stack, from the saved stack pointer upwards:
 *   [mxcsr:4 | x87 cw:2 | pad:2] r15 r14 r13 r12 rbx rbp return-address
 * runtime.cpp builds the same frame on a fresh fiber stack with return address
 * patchbay_emu_trampoline and rbx = the Fiber*.
 */
    .text

    .globl  patchbay_emu_switch
    .hidden patchbay_emu_switch
    .type   patchbay_emu_switch, @function
    .p2align 4
patchbay_emu_switch:
    .cfi_startproc
    pushq   %rbp
    pushq   %rbx
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    subq    $8, %rsp
    stmxcsr (%rsp)
    fnstcw  4(%rsp)
    movq    %rsp, (%rdi)
    movq    %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw   4(%rsp)
    addq    $8, %rsp
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %rbx
    popq    %rbp
    ret
    .cfi_endproc
    .size   patchbay_emu_switch, .-patchbay_emu_switch

/* First code a fiber runs: patchbay_emu_fiber_main(rbx), which never returns. */
    .globl  patchbay_emu_trampoline
    .hidden patchbay_emu_trampoline
    .type   patchbay_emu_trampoline, @function
    .p2align 4
patchbay_emu_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq    %rbx, %rdi
    andq    $-16, %rsp
    call    patchbay_emu_fiber_main@PLT
    ud2
    .cfi_endproc
    .size   patchbay_emu_trampoline, .-patchbay_emu_trampoline

    .section .note.GNU-stack,"",@progbits
