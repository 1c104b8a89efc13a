package introspect

import (
	"encoding/binary"
	"testing"
)

// e820Bytes builds a struct e820_table of entries.
func e820Bytes(entries ...E820Entry) []byte {
	b := binary.LittleEndian.AppendUint32(nil, uint32(len(entries)))
	for _, e := range entries {
		b = binary.LittleEndian.AppendUint64(b, e.Addr)
		b = binary.LittleEndian.AppendUint64(b, e.Size)
		b = binary.LittleEndian.AppendUint32(b, e.Type)
	}
	return b
}

func TestParseE820(t *testing.T) {
	want := []E820Entry{{0, 0x9fc00, 1}, {0x100000, 0x7fee0000, 1}, {0xfeffc000, 0x4000, 2}}
	got, err := parseE820(e820Bytes(want...))
	if err != nil || len(got) != len(want) {
		t.Fatalf("parseE820: %v, %v", got, err)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	for name, b := range map[string][]byte{
		"short":       {1, 0},
		"truncated":   e820Bytes(want...)[:30],
		"too many":    binary.LittleEndian.AppendUint32(nil, maxE820+1),
		"wraps round": e820Bytes(E820Entry{Addr: 1 << 63, Size: 1 << 63, Type: 1}),
	} {
		if _, err := parseE820(b); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// FuzzE820: the table comes from guest memory; the parser returns an
// error or at most maxE820 entries that do not wrap, and never panics.
func FuzzE820(f *testing.F) {
	f.Add(e820Bytes(E820Entry{0, 0x9fc00, 1}, E820Entry{1 << 32, 1 << 30, 1}))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := parseE820(b)
		if err != nil {
			return
		}
		if len(es) > maxE820 {
			t.Fatalf("%d entries", len(es))
		}
		for _, e := range es {
			if e.Addr+e.Size < e.Addr {
				t.Fatalf("entry %+v wraps", e)
			}
		}
	})
}
