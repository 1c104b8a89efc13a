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
