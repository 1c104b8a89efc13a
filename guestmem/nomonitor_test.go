package guestmem

import (
	"strings"
	"testing"
)

func TestRAMSize(t *testing.T) {
	for _, c := range []struct {
		argv []string
		want uint64
		err  string
	}{
		{[]string{"qemu", "-m", "512"}, 512 << 20, ""},
		{[]string{"qemu", "-m", "2G"}, 2 << 30, ""},
		{[]string{"qemu", "-m", "size=524288k,slots=4,maxmem=8G"}, 512 << 20, ""},
		{[]string{"qemu", "--m=64M"}, 64 << 20, ""},
		{[]string{"qemu", "-kernel", "k"}, 128 << 20, ""},
		{[]string{"qemu", "-m", "512", "-numa", "node"}, 0, "NUMA"},
		{[]string{"qemu", "-m", "slots=4"}, 0, "names no size"},
		{[]string{"qemu", "-m", "lots"}, 0, "bad RAM size"},
		{[]string{"qemu", "-m", "0"}, 0, "bad RAM size"},
		{[]string{"qemu", "-m", "99999999999T"}, 0, "bad RAM size"},
	} {
		got, err := ramSize(c.argv)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%v: %d, %v; want an error with %q", c.argv, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%v: %d, %v; want %d", c.argv, got, err, c.want)
		}
	}
}

// FuzzRAMSize: QEMU's command line (read from a process that may be
// hostile) never panics the parser.
func FuzzRAMSize(f *testing.F) {
	f.Add("qemu\x00-m\x00size=524288k,slots=4")
	f.Add("qemu\x00-m\x002G\x00-numa")
	f.Fuzz(func(t *testing.T, cmdline string) {
		if n, err := ramSize(strings.Split(cmdline, "\x00")); err == nil && n == 0 {
			t.Fatal("a zero size without an error")
		}
	})
}

// TestRAMSplit: the RAM below 4 GiB of each PC machine type, as QEMU's
// own examples (hw/i386/pc_piix.c) and pc_q35.c give it.
func TestRAMSplit(t *testing.T) {
	const gib, mib = 1 << 30, 1 << 20
	for _, c := range []struct {
		argv  []string
		size  uint64
		below uint64
		err   string
	}{
		{[]string{"qemu"}, 512 * mib, 512 * mib, ""},
		{[]string{"qemu"}, 3 * gib, 3 * gib, ""},
		{[]string{"qemu", "-M", "pc"}, 4 * gib, 3 * gib, ""},
		{[]string{"qemu", "-machine", "pc-i440fx-7.2,accel=kvm"}, 3584 * mib, 3 * gib, ""},
		{[]string{"qemu", "-M", "pc,max-ram-below-4g=2G"}, 4 * gib, 2 * gib, ""},
		{[]string{"qemu", "-M", "pc,max-ram-below-4g=4G"}, 3968 * mib, 3968 * mib, ""},
		{[]string{"qemu", "-machine", "accel=kvm", "-machine", "q35"}, 2 * gib, 2 * gib, ""},
		{[]string{"qemu", "-machine", "q35"}, 2816 * mib, 2 * gib, ""},
		{[]string{"qemu", "-machine", "type=pc-q35-7.2,max-ram-below-4g=1G"}, 2 * gib, gib, ""},
		{[]string{"qemu", "-M", "q35"}, 2815 * mib, 2815 * mib, ""},
		{[]string{"qemu", "-M", "microvm"}, 1 * gib, 1 * gib, ""},
		{[]string{"qemu", "-M", "microvm"}, 3 * gib, 0, "not known"},
		{[]string{"qemu", "-M", "pc-i440fx-1.7"}, 4 * gib, 0, "not known"},
		{[]string{"qemu", "-M", "pc,max-ram-below-4g=lots"}, 4 * gib, 0, "max-ram-below-4g"},
		{[]string{"qemu", "-M", ",accel=kvm"}, 4 * gib, 0, "no machine type"},
	} {
		got, err := ramSplit(c.argv, c.size)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%v, %d MiB: %d, %v; want an error with %q", c.argv, c.size/mib, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.below {
			t.Errorf("%v, %d MiB: %d MiB below 4G, %v; want %d MiB", c.argv, c.size/mib, got/mib, err, c.below/mib)
		}
	}
}

// FuzzRAMSplit: the machine options come from QEMU's command line too.
func FuzzRAMSplit(f *testing.F) {
	f.Add("qemu\x00-machine\x00type=pc-q35-7.2,max-ram-below-4g=1G", uint64(4<<30))
	f.Fuzz(func(t *testing.T, cmdline string, size uint64) {
		if below, err := ramSplit(strings.Split(cmdline, "\x00"), size); err == nil && below > size {
			t.Fatalf("%d below 4G of %d", below, size)
		}
	})
}
