# Basalt's accelerator probe: a multiboot (v1) image that QEMU loads with
# -kernel and enters in 32-bit protected mode. It fills 64 MiB of RAM with a
# pattern and checks it (every page touched, as a booting kernel does), enters
# long mode and prints "BASALT-KVM-PROBE-OK" on QEMU's debug console (port
# 0x402). Assemble: as --32 -o p.o kvm_probe.S
#                   ld -m elf_i386 -Ttext=0x100000 --oformat binary -o p.bin p.o
        .code32
        .text
        .globl _start
header:                                 # multiboot header, a.out kludge
        .long 0x1BADB002                # magic
        .long 0x00010000                # flags: the address fields are valid
        .long -(0x1BADB002 + 0x00010000)
        .long header                    # header_addr
        .long header                    # load_addr
        .long 0                         # load_end_addr: the whole file
        .long 0                         # bss_end_addr: none
        .long _start                    # entry_addr
_start:
        mov $0x400000, %edi             # fill 4 MiB .. 68 MiB
        mov $0x1000000, %ecx            # 16 Mi dwords
        mov $0x5a5aa5a5, %eax
        cld
        rep stosl
        mov $0x400000, %edi             # and check it
        mov $0x1000000, %ecx
        repe scasl
        jne fail
        mov $0x201000, %edi             # page tables: PML4, PDPT, PD
        xor %eax, %eax
        mov $3072, %ecx
        rep stosl
        movl $0x202003, 0x201000
        movl $0x203003, 0x202000
        movl $0x000083, 0x203000        # identity map of the first 2 MiB
        mov %cr4, %eax
        or $0x20, %eax                  # PAE
        mov %eax, %cr4
        mov $0x201000, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx           # EFER.LME
        rdmsr
        or $0x100, %eax
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax            # PG, PE
        mov %eax, %cr0
        lgdt gdtr
        ljmp $0x08, $long64
fail:
        hlt
        jmp fail
        .code64
long64:
        lea ok(%rip), %rsi
        mov $0x402, %dx
1:      lodsb
        test %al, %al
        jz 2f
        out %al, %dx
        jmp 1b
2:      hlt
        jmp 2b
ok:     .asciz "BASALT-KVM-PROBE-OK\n"
        .align 8
gdt:
        .quad 0
        .quad 0x00209A0000000000        # 64-bit code segment
gdtr:
        .word gdtr - gdt - 1
        .long gdt
