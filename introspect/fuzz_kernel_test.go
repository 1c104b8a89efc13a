package introspect

import (
	"bytes"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// FuzzKallsyms feeds the kallsyms reader arbitrary "kernel image" bytes:
// it must return an error or a table whose lookups stay in bounds, never
// panic or run unbounded.
func FuzzKallsyms(f *testing.F) {
	syms := genSymbols(300)
	for _, l := range genLayouts {
		if l.addrs != "absolute" && !l.percpu {
			continue
		}
		f.Add(genTables(f, syms, l, 0xffffffff82000000))
	}
	good := genTables(f, syms, genLayouts[5], 0xffffffff82000000)
	f.Add(good[:len(good)/2])
	f.Add(tokenDigits)
	f.Fuzz(func(t *testing.T, data []byte) {
		for off, tries := 0, 0; tries < 4; tries++ {
			i := bytes.Index(data[off:], tokenDigits)
			if i < 0 {
				return
			}
			ks, err := parseKallsyms(data, off+i)
			off += i + 1
			if err != nil {
				continue
			}
			if ks.relative {
				ks.relocate(0xffffffff82000000)
			}
			for j := 0; j < ks.Len() && j < 64; j++ {
				s := ks.Symbol(j)
				if len(s.Name) > ksymNameLen {
					t.Fatalf("symbol %d: name of %d bytes", j, len(s.Name))
				}
				if a, ok := ks.Lookup(s.Name); ok && a > s.Addr && s.Name != "" {
					// Lookup returns the lowest address of equal names.
					t.Fatalf("Lookup(%q) = %#x > %#x", s.Name, a, s.Addr)
				}
				ks.At(s.Addr + 1)
			}
		}
	})
}

// FuzzBTFCarve feeds the BTF carver and parser arbitrary image bytes.
func FuzzBTFCarve(f *testing.F) {
	raw := testBTF(f)
	f.Add(raw)
	f.Add(append(bytes.Repeat([]byte{0x9f, 0xeb, 1, 0}, 8), raw...))
	f.Add(raw[:len(raw)/2])
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := carveBTF(data)
		if err != nil {
			return
		}
		if len(b) > len(data) {
			t.Fatalf("carved %d bytes out of %d", len(b), len(data))
		}
		spec, err := btf.LoadSpecFromReader(bytes.NewReader(b))
		if err != nil {
			return
		}
		k := &Kernel{BTF: spec}
		k.MemberOffset("task_struct", "tasks.prev")
		k.MemberOffset("task_struct", "rcu_head")
		k.TypeSize("task_struct")
	})
}

// FuzzBanner feeds the banner parser arbitrary bytes.
func FuzzBanner(f *testing.F) {
	f.Add([]byte("Linux version 6.1.0-56-cloud-amd64 (x) #1 SMP\n"))
	f.Add([]byte("Linux version 99999999999.1"))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, _, err := parseBanner(data)
		if err == nil && len(s) > maxBanner {
			t.Fatalf("banner of %d bytes", len(s))
		}
	})
}
