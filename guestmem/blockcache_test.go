package guestmem

import (
	"bytes"
	"errors"
	"math/rand"
	"testing"
)

func TestBlockCache(t *testing.T) {
	low := make([]byte, 0xa0000)
	high := make([]byte, 1<<20+100) // ends mid-block
	rand.New(rand.NewSource(1)).Read(low)
	rand.New(rand.NewSource(2)).Read(high)
	mem := &sliceMem{
		regions: []Region{{GPA: 0, Size: uint64(len(low))}, {GPA: 0x100000, Size: uint64(len(high))}},
		data:    [][]byte{low, high},
	}
	c := NewBlockCache(mem, 64<<10, 1<<20)
	check := func(gpa, n int, want []byte) {
		t.Helper()
		got := make([]byte, n)
		if _, err := c.ReadAt(got, int64(gpa)); err != nil {
			t.Fatalf("read %#x+%d: %v", gpa, n, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("read %#x+%d differs: %x vs %x", gpa, n, got[:8], want[:8])
		}
	}
	check(0x1000, 0x100, low[0x1000:0x1100])
	check(0x1f000, 0x2000, low[0x1f000:0x21000]) // crosses a block boundary
	before := c.Reads()
	for i := 0; i < 100; i++ {
		check(0x1000+i*64, 64, low[0x1000+i*64:0x1000+i*64+64])
	}
	if c.Reads() != before {
		t.Errorf("reads within cached blocks reached the memory: %d -> %d", before, c.Reads())
	}
	// The last block of high memory straddles the end of RAM: served
	// directly, correctly.
	end := 0x100000 + len(high)
	check(end-50, 50, high[len(high)-50:])
	// Past the end: the hole error of the memory below.
	_, err := c.ReadAt(make([]byte, 8), int64(end+10))
	var hole *HoleError
	if !errors.As(err, &hole) {
		t.Errorf("read past RAM: %v", err)
	}
	// More than maxBytes of blocks: still correct.
	for off := 0; off+4096 <= len(high); off += 64 << 10 {
		check(0x100000+off, 4096, high[off:off+4096])
	}
}
