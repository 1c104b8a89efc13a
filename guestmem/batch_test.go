package guestmem

import (
	"bytes"
	"errors"
	"testing"
)

// TestReadVirtBatch reads through several address spaces at once and
// checks every result against the one-at-a-time walker.
func TestReadVirtBatch(t *testing.T) {
	b := newTableBuilder(8<<20, 4)
	const (
		kva  = 0xffffffff81000000
		kva2 = 0xffff888000200000
		uva  = 0x00007ffff7a00000
	)
	b.mapPage(kva, 0x300000, 12, 1<<63)
	b.mapPage(kva+0x1000, 0x1ff000, 12, 0)
	b.mapPage(kva2, 0x400000, 21, 0)
	copy(b.mem[0x300ff8:], "ABCDEFGH")
	copy(b.mem[0x1ff000:], "IJKLMNOP")
	copy(b.mem[0x4abcde:], "2mpage")
	walker := NewAddressSpace(b.mem, b.root, 4)
	reqs := []VirtReq{
		{Root: b.root, VA: kva + 0xff8, Buf: make([]byte, 16)}, // crosses pages
		{Root: b.root, VA: kva2 + 0xabcde, Buf: make([]byte, 6)},
		{Root: b.root | 0x7, VA: kva, Buf: make([]byte, 4096)},
		{Root: b.root, VA: uva, Buf: make([]byte, 8)},           // not mapped
		{Root: b.root, VA: kva + 0x1ff0, Buf: make([]byte, 32)}, // second page mapped, third not
	}
	ReadVirtBatch(b.mem, 4, reqs)
	for i, r := range reqs {
		want := make([]byte, len(r.Buf))
		n, err := walker.ReadAt(want, int64(r.VA))
		if r.N != n || !bytes.Equal(r.Buf[:r.N], want[:n]) || (err == nil) != (r.Err == nil) {
			t.Errorf("req %d: batch read %d bytes (err %v), walker %d (err %v)", i, r.N, r.Err, n, err)
		}
	}
	if string(reqs[0].Buf) != "ABCDEFGHIJKLMNOP" || string(reqs[1].Buf) != "2mpage" {
		t.Errorf("batch reads: %q %q", reqs[0].Buf, reqs[1].Buf)
	}
	var np *NotPresentError
	if !errors.As(reqs[3].Err, &np) {
		t.Errorf("unmapped read: %v", reqs[3].Err)
	}
}

// FuzzReadVirtBatch: hostile page tables end every walk with data or an
// error, never a panic.
func FuzzReadVirtBatch(f *testing.F) {
	f.Add([]byte{0x03, 0x10, 0, 0, 0, 0, 0, 0}, uint64(0xffffffff81000000), uint16(100))
	f.Fuzz(func(t *testing.T, tables []byte, va uint64, n uint16) {
		mem := &sliceMem{regions: []Region{{GPA: 0, Size: 1 << 16}}, data: [][]byte{make([]byte, 1<<16)}}
		copy(mem.data[0], tables)
		reqs := []VirtReq{{Root: 0, VA: va, Buf: make([]byte, int(n)%8192)}, {Root: 0x1000, VA: va ^ 0xfff, Buf: make([]byte, 16)}}
		ReadVirtBatch(mem, 4, reqs)
		for _, r := range reqs {
			if r.N < 0 || r.N > len(r.Buf) {
				t.Fatalf("N = %d of %d", r.N, len(r.Buf))
			}
		}
	})
}
