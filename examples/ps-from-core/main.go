// Command ps-from-core lists the processes in an ELF memory dump of a Linux
// guest (QEMU's dump-guest-memory or kvmscope dump) using the kvmscope
// packages directly: guestmem reads the dump, introspect finds the kernel,
// its offsets (BTF or solved) and walks the task list. No profile needed.
//
//	go run ./examples/ps-from-core guest.core
package main

import (
	"fmt"
	"os"

	"github.com/kvmscope/kvmscope/guestmem"
	"github.com/kvmscope/kvmscope/introspect"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: ps-from-core CORE")
		os.Exit(2)
	}
	if err := run(os.Args[1]); err != nil {
		fmt.Fprintln(os.Stderr, "ps-from-core:", err)
		os.Exit(1)
	}
}

func run(path string) error {
	core, err := guestmem.OpenCore(path)
	if err != nil {
		return err
	}
	defer core.Close()
	k, err := introspect.Discover(core, introspect.DiscoverOptions{})
	if err != nil {
		return err
	}
	off, err := introspect.FindOffsets(k)
	if off == nil {
		return err
	}
	procs, err := k.Processes(off, introspect.ProcessOptions{})
	if err != nil {
		return err
	}
	fmt.Println(k.Banner)
	for _, p := range procs {
		fmt.Printf("%6d %6d %5d %s\n", p.PID, p.PPID, p.UID, p.Comm)
	}
	return nil
}
