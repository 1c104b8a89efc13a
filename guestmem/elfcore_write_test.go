package guestmem

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
)

// sliceMem is guest memory held in byte slices (test data, not a mock of
// the writer or the reader under test).
type sliceMem struct {
	regions []Region
	data    [][]byte
}

func (m *sliceMem) Regions() []Region { return m.regions }

func (m *sliceMem) ReadAt(p []byte, gpa int64) (int, error) {
	for i, r := range m.regions {
		if uint64(gpa) >= r.GPA && uint64(gpa)+uint64(len(p)) <= r.End() {
			return copy(p, m.data[i][uint64(gpa)-r.GPA:]), nil
		}
	}
	return 0, &HoleError{GPA: uint64(gpa)}
}

// TestWriteCoreRoundTrip writes a core and reads it back with OpenCore.
func TestWriteCoreRoundTrip(t *testing.T) {
	low := bytes.Repeat([]byte("low memory!!"), 0xa0000/12+1)[:0xa0000]
	high := make([]byte, 3<<20)
	for i := range high {
		high[i] = byte(i * 7)
	}
	mem := &sliceMem{
		regions: []Region{{GPA: 0, Size: 0xa0000}, {GPA: 0x100000, Size: 3 << 20}, {GPA: 0xfffc0000, Size: 0x40000, ReadOnly: true}},
		data:    [][]byte{low, high, make([]byte, 0x40000)},
	}
	cpus := []CPU{
		{ID: 0, RIP: 0xffffffff81000123, RSP: 0xffffc90000003f00, RFLAGS: 0x246, CR0: 0x80050033, CR3: 0x1a2b000, CR4: 0x3506f0, CSL: true, GSBase: 0xffff888007a00000},
		{ID: 1, RIP: 0xfff0, CR0: 0x60000010, CSBase: 0xffff0000},
	}
	path := filepath.Join(t.TempDir(), "core")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	var last uint64
	if err := WriteCore(f, mem, cpus, func(done, total uint64) { last = done }); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if st, _ := os.Stat(path); st == nil || uint64(st.Size()) != must(CoreSize(mem, cpus)) {
		t.Errorf("file size %v, CoreSize %d", st.Size(), must(CoreSize(mem, cpus)))
	}
	if last != 0xa0000+3<<20 {
		t.Errorf("progress ended at %d", last)
	}
	c, err := OpenCore(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if rs := c.Regions(); len(rs) != 2 || rs[0].Size != 0xa0000 || rs[1].GPA != 0x100000 {
		t.Fatalf("regions = %+v", rs)
	}
	got := make([]byte, 3<<20)
	if _, err := c.ReadAt(got, 0x100000); err != nil || !bytes.Equal(got, high) {
		t.Fatalf("high memory differs (err %v)", err)
	}
	if _, err := c.ReadAt(got[:16], 0xa0000); err == nil {
		t.Errorf("read of the hole succeeded")
	}
	back, err := c.CPUs(context.Background())
	if err != nil || len(back) != 2 {
		t.Fatalf("CPUs: %v %+v", err, back)
	}
	b := back[0]
	if b.RIP != cpus[0].RIP || b.CR3 != cpus[0].CR3 || b.CR0 != cpus[0].CR0 || b.CR4 != cpus[0].CR4 || !b.CSL || b.GSBase != cpus[0].GSBase || b.Mode() != "long" {
		t.Errorf("CPU 0 back = %+v", b)
	}
	if back[1].Mode() != "real" || back[1].CSBase != 0xffff0000 {
		t.Errorf("CPU 1 back = %+v", back[1])
	}
}

func must(v uint64, err error) uint64 {
	if err != nil {
		panic(err)
	}
	return v
}
