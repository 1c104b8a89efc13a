package testguest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
)

// QEMUArgs returns the standard QEMU argv (without the binary) that boots the
// tiny guest built by Build with smp vCPUs, accelerator accel ("kvm", "tcg";
// empty for QEMU's default) and kernel command line cmdline ("" to spin,
// "exit=N", "io=N").
//
// Precondition: Build has succeeded; QEMUArgs calls it and panics with
// Build's error otherwise. Call Build first and handle its error, or use
// KernelArgs.
func QEMUArgs(smp int, accel string, cmdline string) []string {
	kernel, err := Build()
	if err != nil {
		panic("testguest.QEMUArgs without a successful Build: " + err.Error())
	}
	return KernelArgs(kernel, smp, accel, cmdline)
}

// KernelArgs is QEMUArgs for the guest ELF at kernel.
//
// The machine is "pc" with 64 MiB, no default devices, no display, no serial
// port, isa-debug-exit at DebugExitPort, and -no-reboot so that a guest
// fault (a triple fault resets) ends QEMU instead of looping. The firmware is
// qboot (shipped with QEMU, Debian package qemu-system-data) when found:
// under the development machines' KVM, which emulates ring-0 code at about
// 2e5 instructions per second, SeaBIOS takes 5 to 35 s to reach the guest
// and qboot about 0.2 s.
func KernelArgs(kernel string, smp int, accel string, cmdline string) []string {
	if smp < 1 {
		smp = 1
	}
	args := []string{"-nodefaults", "-machine", "pc"}
	if fw := Firmware(); fw != "" {
		args = append(args, "-bios", fw)
	}
	if accel != "" {
		args = append(args, "-accel", accel)
	}
	args = append(args,
		"-m", strconv.Itoa(MemoryMiB)+"M",
		"-smp", strconv.Itoa(smp),
		"-display", "none",
		"-serial", "none",
		"-no-reboot",
		"-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
		"-kernel", kernel,
	)
	if cmdline != "" {
		args = append(args, "-append", cmdline)
	}
	return args
}

// Firmware returns the path of qboot.rom from QEMU's data directories, or ""
// when it is not installed (QEMU then uses SeaBIOS, which works but boots
// slowly on an emulating KVM).
func Firmware() string {
	dirs := []string{"/usr/share/qemu", "/usr/local/share/qemu"}
	if q, err := exec.LookPath("qemu-system-x86_64"); err == nil {
		if r, err := filepath.EvalSymlinks(q); err == nil {
			dirs = append(dirs, filepath.Join(filepath.Dir(r), "..", "share", "qemu"))
		}
	}
	for _, d := range dirs {
		p := filepath.Join(d, "qboot.rom")
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() {
			return filepath.Clean(p)
		}
	}
	return ""
}
