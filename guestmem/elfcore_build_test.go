package guestmem

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/binary"
	"errors"
	"testing"
)

// coreLoad is one PT_LOAD for buildCore.
type coreLoad struct {
	gpa   uint64
	data  []byte
	memsz uint64
}

// buildCore writes an ELF64 core laid out as QEMU's dump-guest-memory
// writes one: ELF header, program headers (PT_NOTE first), notes, memory.
// Test data for the reader, from the documented format.
func buildCore(notes []byte, loads []coreLoad) []byte {
	const ehsize, phsize = 64, 56
	nph := 1 + len(loads)
	off := uint64(ehsize + phsize*nph)
	var hdr, phdrs, body bytes.Buffer
	le := binary.LittleEndian
	binary.Write(&hdr, le, elf.Header64{
		Ident:     [16]byte{0x7f, 'E', 'L', 'F', byte(elf.ELFCLASS64), byte(elf.ELFDATA2LSB), byte(elf.EV_CURRENT)},
		Type:      uint16(elf.ET_CORE),
		Machine:   uint16(elf.EM_X86_64),
		Version:   uint32(elf.EV_CURRENT),
		Phoff:     ehsize,
		Ehsize:    ehsize,
		Phentsize: phsize,
		Phnum:     uint16(nph),
	})
	binary.Write(&phdrs, le, elf.Prog64{Type: uint32(elf.PT_NOTE), Off: off, Filesz: uint64(len(notes)), Memsz: uint64(len(notes))})
	body.Write(notes)
	off += uint64(len(notes))
	for _, l := range loads {
		binary.Write(&phdrs, le, elf.Prog64{Type: uint32(elf.PT_LOAD), Off: off, Paddr: l.gpa, Filesz: uint64(len(l.data)), Memsz: l.memsz})
		body.Write(l.data)
		off += uint64(len(l.data))
	}
	return append(append(hdr.Bytes(), phdrs.Bytes()...), body.Bytes()...)
}

// note encodes one ELF note.
func note(name string, typ uint32, desc []byte) []byte {
	var b bytes.Buffer
	le := binary.LittleEndian
	binary.Write(&b, le, [3]uint32{uint32(len(name) + 1), uint32(len(desc)), typ})
	b.WriteString(name)
	b.Write(make([]byte, (len(name)+1+3)&^3-len(name)))
	b.Write(desc)
	b.Write(make([]byte, (len(desc)+3)&^3-len(desc)))
	return b.Bytes()
}

// qemuNotes returns NT_PRSTATUS and QEMU CPU-state notes for n vCPUs with
// long-mode state; vCPU i has CR3 0x1000*(i+1) and RIP 0xffffffff81000000+i.
func qemuNotes(n int, withKernelGSBase bool) []byte {
	le := binary.LittleEndian
	var out []byte
	for i := 0; i < n; i++ {
		d := make([]byte, prstatus64Size+8)
		le.PutUint32(d[prstatus64PID:], uint32(i+1))
		le.PutUint64(d[prstatus64Regs+8*ur64RIP:], 0xffffffff81000000+uint64(i))
		le.PutUint64(d[prstatus64Regs+8*ur64CS:], 0x10)
		out = append(out, note("CORE", uint32(elf.NT_PRSTATUS), d)...)
	}
	for i := 0; i < n; i++ {
		size := qcsMinSize
		if withKernelGSBase {
			size += 8
		}
		d := make([]byte, size)
		le.PutUint32(d, 1)
		le.PutUint32(d[4:], uint32(size))
		le.PutUint64(d[qcsRIP:], 0xffffffff81000000+uint64(i))
		le.PutUint32(d[qcsSegs+qsegCS*qcsSegSize+8:], descL|0x9b00)
		le.PutUint64(d[qcsSegs+qsegGS*qcsSegSize+16:], 0xffff88801f000000+uint64(i)<<20)
		le.PutUint64(d[qcsCR:], CR0PE|CR0PG)
		le.PutUint64(d[qcsCR+3*8:], 0x1000*uint64(i+1))
		le.PutUint64(d[qcsCR+4*8:], CR4PAE)
		if withKernelGSBase {
			le.PutUint64(d[qcsKernelGSBase:], 0x7f0000000000)
		}
		out = append(out, note("QEMU", 0, d)...)
	}
	return out
}

func TestCoreSynthetic(t *testing.T) {
	low := bytes.Repeat([]byte{0xaa}, 0x1000)
	high := bytes.Repeat([]byte{0xbb}, 0x800)
	b := buildCore(qemuNotes(3, true), []coreLoad{
		{gpa: 0x100000, data: high, memsz: 0x1000}, // filesz < memsz: zeros after
		{gpa: 0, data: low, memsz: 0x1000},
		{gpa: 0x1000, data: low[:0x100], memsz: 0x100}, // adjacent: merged region
	})
	c, err := NewCore(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	want := []Region{{GPA: 0, Size: 0x1100, Name: "core"}, {GPA: 0x100000, Size: 0x1000, Name: "core"}}
	if got := c.Regions(); len(got) != 2 || got[0] != want[0] || got[1] != want[1] {
		t.Errorf("Regions = %+v, want %+v", got, want)
	}
	p := make([]byte, 0x20)
	if n, err := c.ReadAt(p, 0xff0); n != 0x20 || err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0xaa}, 0x20)) {
		t.Errorf("read across adjacent segments: %d %v %x", n, err, p)
	}
	if n, err := c.ReadAt(p, 0x1007f0); n != 0x20 || err != nil || !bytes.Equal(p[:0x10], high[:0x10]) || !bytes.Equal(p[0x10:], make([]byte, 0x10)) {
		t.Errorf("read into the zero-filled tail: %d %v %x", n, err, p)
	}
	var hole *HoleError
	if n, err := c.ReadAt(p, 0x10f0); n != 0x10 || !errors.As(err, &hole) || hole.GPA != 0x1100 {
		t.Errorf("read into a gap: %d %v", n, err)
	}
	if n, err := c.ReadAt(p, 0x2000); n != 0 || !errors.As(err, &hole) || hole.GPA != 0x2000 {
		t.Errorf("read in a gap: %d %v", n, err)
	}
	if _, err := c.ReadAt(p, -1); !errors.As(err, &hole) {
		t.Errorf("negative address: %v", err)
	}
	cpus, err := c.CPUs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(cpus) != 3 {
		t.Fatalf("%d CPUs", len(cpus))
	}
	for i, cpu := range cpus {
		if cpu.ID != i || cpu.CR3 != 0x1000*uint64(i+1) || cpu.RIP != 0xffffffff81000000+uint64(i) ||
			!cpu.CSL || cpu.Mode() != "long" || cpu.Paging() != 4 || cpu.KernelGSBase != 0x7f0000000000 ||
			cpu.GSBase != 0xffff88801f000000+uint64(i)<<20 {
			t.Errorf("CPU %d = %+v", i, cpu)
		}
	}

	// Version-1 notes without kernel_gs_base, and malformed cores.
	b = buildCore(qemuNotes(1, false), []coreLoad{{gpa: 0, data: low, memsz: 0x1000}})
	if c, err := NewCore(bytes.NewReader(b), int64(len(b))); err != nil {
		t.Error(err)
	} else if cpus, err := c.CPUs(context.Background()); err != nil || len(cpus) != 1 || cpus[0].KernelGSBase != 0 {
		t.Errorf("v1 note: %+v %v", cpus, err)
	}
	for name, b := range map[string][]byte{
		"no memory":    buildCore(qemuNotes(1, false), nil),
		"overlap":      buildCore(nil, []coreLoad{{gpa: 0, data: low, memsz: 0x1000}, {gpa: 0x800, data: low, memsz: 0x1000}}),
		"filesz>memsz": buildCore(nil, []coreLoad{{gpa: 0, data: low, memsz: 0x10}}),
		"truncated":    buildCore(nil, []coreLoad{{gpa: 0, data: low, memsz: 0x1000}})[:0x200],
		"not ELF":      bytes.Repeat([]byte{1}, 100),
	} {
		if _, err := NewCore(bytes.NewReader(b), int64(len(b))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// Memory without CPU notes opens; CPUs says what is missing.
	b = buildCore(nil, []coreLoad{{gpa: 0, data: low, memsz: 0x1000}})
	if c, err := NewCore(bytes.NewReader(b), int64(len(b))); err != nil {
		t.Error(err)
	} else if _, err := c.CPUs(context.Background()); err == nil {
		t.Error("CPUs of a core without notes: no error")
	}
}
