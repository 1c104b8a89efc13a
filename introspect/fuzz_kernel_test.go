package introspect

import (
	"bytes"
	"testing"

	"github.com/cilium/ebpf/btf"

	"github.com/kvmscope/kvmscope/guestmem"
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

// FuzzDiscover runs the whole discovery over a synthetic kernel
// (synthKernel) that the fuzzer damages: each patch picks one of the
// structures discovery reads (kallsyms, page tables, banner, BTF, or
// anywhere) and overwrites a few bytes there. Discover must fail with an
// error or return a kernel whose accessors stay in bounds.
func FuzzDiscover(f *testing.F) {
	s := synthKernel(f)
	f.Add([]byte{})
	f.Add([]byte{4})                                              // odd length: text symbols only
	f.Add([]byte{0, 0x10, 0x00, 4, 0xff, 0xff, 0xff, 0xff})       // kallsyms
	f.Add([]byte{1, 0x1f, 0xf8, 8, 0x63, 0, 0x90, 0, 0, 0, 0, 0}) // PGD[511]
	f.Add([]byte{1, 0x20, 0xc0, 8, 0xe3, 0x01, 0, 0, 0, 0, 0, 0}) // level2 entry
	f.Add([]byte{2, 0, 14, 2, '9', '9'})                          // banner
	f.Add([]byte{3, 0, 8, 4, 0xff, 0xff, 0xff, 0x7f})             // BTF header
	regions := [][2]uint64{
		{s.syms, 0x10000},                // kallsyms tables
		{s.pgd, 0x5000},                  // PGD, level3/level2_kernel_pgt, direct map
		{synthPhysBase + 0x80000, 0x100}, // linux_banner
		{synthPhysBase + 3<<20, 0x400},   // BTF
		{0, synthMem},
	}
	f.Add([]byte{1, 0x1f, 0xf8, 8, 0x63, 0, 0x90, 0, 0, 0, 0, 0, 0, 0}) // PGD[511], with a vCPU
	f.Fuzz(func(t *testing.T, patch []byte) {
		odd := len(patch)%2 == 1
		// Lengths 4k+2 add a vCPU on the kernel's page tables, so the
		// patched tables are walked from CR3 too.
		var cpus []guestmem.CPU
		if len(patch)%4 == 2 {
			cpus = []guestmem.CPU{synthCPU(s)}
		}
		m := &patchedMem{base: s.mem}
		for len(patch) >= 5 {
			r := regions[int(patch[0])%len(regions)]
			off := r[0] + (uint64(patch[1])<<16|uint64(patch[2])<<8|uint64(patch[3]))%r[1]
			n := min(int(patch[4])%16, len(patch)-5)
			m.patches = append(m.patches, memPatch{off, patch[5 : 5+n]})
			patch = patch[5+n:]
		}
		// Odd-length patches take the paths for kernels without data
		// symbols: PGD and memory layout from the page tables' structure,
		// banner and BTF by scanning the image.
		var filter func(*Kallsyms) *Kallsyms
		if odd {
			filter = textOnly
		}
		k, err := discover(m, DiscoverOptions{CPUs: cpus}, filter)
		if err != nil {
			return
		}
		k.Symbol("init_task")
		k.SymbolAt(k.TextVA + 0x1234)
		k.ReadU64(k.PageOffsetBase + 0x1000)
		k.ReadU64(k.TextVA)
		k.MemberOffset("task_struct", "tasks")
		for i := 0; i < k.Syms.Len() && i < 32; i++ {
			k.Syms.Symbol(i)
		}
	})
}

// patchedMem is base with a few byte ranges overwritten, without copying
// base (a slice, a dump, a live guest).
type patchedMem struct {
	base    guestmem.Memory
	patches []memPatch
}

type memPatch struct {
	off  uint64
	data []byte
}

func (m *patchedMem) Regions() []guestmem.Region { return m.base.Regions() }

func (m *patchedMem) ReadAt(p []byte, gpa int64) (int, error) {
	n, err := m.base.ReadAt(p, gpa)
	for _, pt := range m.patches {
		lo, hi := max(pt.off, uint64(gpa)), min(pt.off+uint64(len(pt.data)), uint64(gpa)+uint64(n))
		if lo < hi {
			copy(p[lo-uint64(gpa):hi-uint64(gpa)], pt.data[lo-pt.off:])
		}
	}
	return n, err
}
