// Package testguest builds and describes the tiny test guest in
// testdata/tinyguest: a multiboot ELF that QEMU boots with -kernel, which
// enters 64-bit long mode with its own 4-level page tables, writes known
// patterns to known guest-physical pages, publishes a ready marker and then
// spins incrementing a counter, exits QEMU with a chosen status, performs a
// chosen number of port-I/O exits, or waits for the host to write its
// registers (see testdata/tinyguest/README.md).
//
// Tests of other packages use it to check what they read from a running VM
// against values known in advance:
//
//	kernel, err := testguest.Build()
//	if err != nil { t.Fatal(err) }
//	testenv.Require(t, testenv.QEMU, testenv.KVM) // internal/testenv
//	args := testguest.KernelArgs(kernel, 1, "kvm", "")
//	cmd := exec.Command("qemu-system-x86_64", args...)
//
// then wait until ReadyGPA holds ReadyValue, and compare.
package testguest
