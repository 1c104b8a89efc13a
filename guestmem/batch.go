package guestmem

import (
	"encoding/binary"
	"fmt"
)

// PhysReq is one read of guest physical memory in a batch.
type PhysReq struct {
	GPA uint64
	Buf []byte
	Err error // set when the read failed
}

// BatchReader is implemented by memory sources that can make many reads
// in one system call (process_vm_readv takes up to 1024 ranges).
type BatchReader interface {
	ReadBatch(reqs []PhysReq)
}

// ReadBatch does every read of reqs: in batches when mem supports it,
// else one at a time.
func ReadBatch(mem Memory, reqs []PhysReq) {
	if b, ok := mem.(BatchReader); ok {
		b.ReadBatch(reqs)
		return
	}
	readEach(mem, reqs)
}

// readEach does reqs one ReadAt at a time.
func readEach(mem Memory, reqs []PhysReq) {
	for i := range reqs {
		if _, err := mem.ReadAt(reqs[i].Buf, int64(reqs[i].GPA)); err != nil {
			reqs[i].Err = err
		}
	}
}

// VirtReq is one read of guest virtual memory through the page tables at
// Root (a CR3 value), in a batch.
type VirtReq struct {
	Root uint64
	VA   uint64
	Buf  []byte
	N    int   // bytes read from the start of Buf
	Err  error // why the read stopped short
}

// ReadVirtBatch reads every VirtReq, walking all their page tables level by
// level together so that each level costs one batched read (one system
// call for a live guest) for all of them, then reading the data the same
// way. It is for many small reads in many address spaces, such as the
// command lines of every process; nothing is cached.
func ReadVirtBatch(mem Memory, levels int, reqs []VirtReq) {
	if levels != 4 && levels != 5 {
		for i := range reqs {
			reqs[i].Err = fmt.Errorf("unsupported paging with %d levels", levels)
		}
		return
	}
	// One piece per page a request touches.
	type piece struct {
		req   int
		off   int // offset in the request's buffer
		n     int
		va    uint64
		table uint64 // the table to read next, or the page's GPA when done
		done  bool
		err   error
	}
	var pieces []piece
	for i := range reqs {
		r := &reqs[i]
		for off := 0; off < len(r.Buf); {
			va := r.VA + uint64(off)
			n := min(len(r.Buf)-off, int(PageSize-va&(PageSize-1)))
			pieces = append(pieces, piece{req: i, off: off, n: n, va: va, table: r.Root & PTEAddrMask})
			off += n
		}
	}
	entries := make([]byte, 8*len(pieces))
	for level := levels; level >= 1; level-- {
		shift := uint(pageShift + 9*(level-1))
		var batch []PhysReq
		var idx []int
		for i := range pieces {
			p := &pieces[i]
			if p.done || p.err != nil {
				continue
			}
			e := (p.va >> shift) & 511
			batch = append(batch, PhysReq{GPA: p.table + e*8, Buf: entries[8*i : 8*i+8]})
			idx = append(idx, i)
		}
		if len(batch) == 0 {
			break
		}
		ReadBatch(mem, batch)
		for k, i := range idx {
			p := &pieces[i]
			if batch[k].Err != nil {
				p.err = batch[k].Err
				continue
			}
			v := binary.LittleEndian.Uint64(batch[k].Buf)
			switch {
			case v&PTEPresent == 0:
				p.err = &NotPresentError{VA: p.va, Level: level}
			case level == 1 || v&PTEPS != 0 && level <= 3:
				p.table = v&PTEAddrMask&^(1<<shift-1) + p.va&(1<<shift-1)
				p.done = true
			case v&PTEPS != 0:
				p.err = fmt.Errorf("translate %#x: reserved PS bit in a level-%d entry", p.va, level)
			default:
				p.table = v & PTEAddrMask
			}
		}
	}
	var batch []PhysReq
	var idx []int
	for i := range pieces {
		p := &pieces[i]
		if p.done && p.err == nil {
			batch = append(batch, PhysReq{GPA: p.table, Buf: reqs[p.req].Buf[p.off : p.off+p.n]})
			idx = append(idx, i)
		}
	}
	ReadBatch(mem, batch)
	for k, i := range idx {
		pieces[i].err = batch[k].Err
	}
	// N counts the bytes read before the first failed piece.
	stopped := make([]bool, len(reqs))
	for _, p := range pieces {
		r := &reqs[p.req]
		if stopped[p.req] {
			continue
		}
		if p.err != nil || !p.done {
			if p.err == nil {
				p.err = fmt.Errorf("translate %#x: no page after %d levels", p.va, levels)
			}
			r.Err = p.err
			stopped[p.req] = true
			continue
		}
		r.N = p.off + p.n
	}
}
