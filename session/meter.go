package session

import (
	"context"
	"sync/atomic"

	"github.com/kvmscope/kvmscope/guestmem"
)

// counts are the reads of guest memory one user of the session made (a
// scan, an API request): bytes and read calls, each read call being at
// most one system call (process_vm_readv) for a live guest whose RAM is
// not a memfd, and a plain copy otherwise.
type counts struct {
	bytes, reads atomic.Int64
	m            *Metrics // also counts every access in the totals
	b            *budget  // a scheduled scan's budget, or nil
}

func (c *counts) read(n int64, calls int64, errs int64) {
	c.bytes.Add(n)
	c.reads.Add(calls)
	c.b.add(n, calls)
	c.m.ReadBytes.Add(float64(n))
	c.m.Reads.Add(float64(calls))
	if errs > 0 {
		c.m.Errors.WithLabelValues("memory_read").Add(float64(errs))
	}
}

// metered is a source whose reads are counted. It keeps what the source
// below can do: batched reads always (guestmem.ReadBatch falls back to one
// read at a time below), and, through the variants meter returns, writes
// and in-place memfd reads only where the source has them, so that a type
// assertion on the metered source answers as one on the source would.
type metered struct {
	src guestmem.Source
	c   *counts
}

func (m metered) Regions() []guestmem.Region { return m.src.Regions() }

func (m metered) CPUs(ctx context.Context) ([]guestmem.CPU, error) { return m.src.CPUs(ctx) }

func (m metered) ReadAt(p []byte, gpa int64) (int, error) {
	if m.c.b.spent() {
		return 0, ErrBudget
	}
	n, err := m.src.ReadAt(p, gpa)
	var errs int64
	if err != nil {
		errs = 1
	}
	m.c.read(int64(n), 1, errs)
	return n, err
}

func (m metered) ReadBatch(reqs []guestmem.PhysReq) {
	if len(reqs) == 0 {
		return
	}
	if m.c.b.spent() {
		for i := range reqs {
			reqs[i].Err = ErrBudget
		}
		return
	}
	guestmem.ReadBatch(m.src, reqs)
	var n, errs int64
	for _, r := range reqs {
		if r.Err != nil {
			errs++
			continue
		}
		n += int64(len(r.Buf))
	}
	m.c.read(n, 1, errs)
}

// Batched reports whether the source below makes batched reads in one
// call (guestmem.CapabilitiesOf); ReadBatch works either way.
func (m metered) Batched() bool {
	_, ok := m.src.(guestmem.BatchReader)
	return ok
}

type meteredWriter struct {
	metered
	w guestmem.Writer
}

func (m meteredWriter) WriteAt(p []byte, gpa int64) (int, error) {
	n, err := m.w.WriteAt(p, gpa)
	m.c.m.WrittenBytes.Add(float64(n))
	if err != nil {
		m.c.m.Errors.WithLabelValues("memory_write").Inc()
	}
	return n, err
}

type meteredInPlace struct {
	metered
	guestmem.InPlace
}

type meteredWriterInPlace struct {
	meteredWriter
	guestmem.InPlace
}

// meter returns src counting into c, with src's capabilities.
func meter(src guestmem.Source, c *counts) guestmem.Source {
	m := metered{src, c}
	w, canWrite := src.(guestmem.Writer)
	ip, inPlace := src.(guestmem.InPlace)
	switch {
	case canWrite && inPlace:
		return meteredWriterInPlace{meteredWriter{m, w}, ip}
	case canWrite:
		return meteredWriter{m, w}
	case inPlace:
		return meteredInPlace{m, ip}
	}
	return m
}

// Writable answers as the source below does (guestmem.CapabilitiesOf).
func (m meteredWriter) Writable() bool { return guestmem.Writable(m.w) }
