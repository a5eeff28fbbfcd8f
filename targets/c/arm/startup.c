/* Minimal Cortex-M startup for QEMU's mps2-an385 (Cortex-M3) / mps2-an386 (Cortex-M4F) boards.
 *
 * The vector table holds the initial stack pointer, the reset handler and the SysTick handler
 * (the harness counts SysTick wraps to time inferences). Reset copies .data from flash, zeroes
 * .bss, enables the FPU when the build uses it, opens the semihosting streams (printf and fopen
 * go to the host through QEMU's -semihosting) and calls exit(main()): main's return value is
 * QEMU's exit code. Toolchain-specific (GCC attributes, CMSIS register addresses) by nature; the
 * model sources themselves are plain C99. */
#include <stdint.h>
#include <stdlib.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _estack;
extern int main(void);
extern void initialise_monitor_handles(void);
void Reset_Handler(void);
void Default_Handler(void);
void SysTick_Handler(void);
void _init(void);
void _fini(void);

__attribute__((section(".isr_vector"), used))
void (*const lbcc_vectors[16])(void) = {
    (void (*)(void))(uintptr_t)&_estack, /* initial SP */
    Reset_Handler,
    Default_Handler, Default_Handler, Default_Handler, Default_Handler, Default_Handler,
    0, 0, 0, 0,
    Default_Handler, Default_Handler, 0, Default_Handler,
    SysTick_Handler,
};

void Default_Handler(void)
{
    exit(99); /* a fault: report it as QEMU's exit code instead of hanging */
}

void Reset_Handler(void)
{
    uint32_t *src = &_sidata, *dst = &_sdata;
    while (dst < &_edata)
        *dst++ = *src++;
    for (dst = &_sbss; dst < &_ebss;)
        *dst++ = 0;
#if defined(__ARM_FP)
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access */
    __asm__ volatile("dsb\n\tisb");
#endif
    initialise_monitor_handles();
    exit(main());
}

void _init(void) {}
void _fini(void) {}
