package ioctl

import (
	"encoding/json"
	"testing"
)

// FuzzDecode decodes every request of the catalogue from hostile memory:
// no panic, no read beyond the struct's layout and the kernel's limits,
// and what decodes marshals.
func FuzzDecode(f *testing.F) {
	f.Add(uint64(0x1000), msrBuf(2, 0x10, 0xc0000082))
	f.Add(uint64(0x1000), make([]byte, 64))
	f.Add(uint64(0xfff), []byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, arg uint64, mem []byte) {
		for _, r := range All() {
			m := &bytesAt{base: 0x1000, b: mem}
			a, err := r.Decode(arg, m)
			if err != nil {
				continue
			}
			if _, err := json.Marshal(&a); err != nil {
				t.Fatalf("%s: %v", r.Name, err)
			}
			for _, fl := range r.Fields {
				v, ok := a.Get(fl.Name)
				if !ok || (!fl.List && len(v) != 1) || len(v) > 256 {
					t.Fatalf("%s: field %s = %v, %v", r.Name, fl.Name, v, ok)
				}
			}
			_ = a.MemoryRegion()
		}
	})
}
