package guestmem

import (
	"errors"
	"fmt"
)

// Memory is guest physical memory.
//
// ReadAt follows io.ReaderAt with the offset being a guest physical address
// (GPA). A read that touches an address no RAM backs fails with a *HoleError
// naming the first such address; bytes before it are still copied and
// counted in n.
type Memory interface {
	ReadAt(p []byte, gpa int64) (n int, err error)
	// Regions lists the guest-physical ranges that hold memory, sorted by
	// GPA and non-overlapping.
	Regions() []Region
}

// Writer is implemented by memory sources that can change guest memory
// (the live source when kvmscope run was given --allow-write).
type Writer interface {
	WriteAt(p []byte, gpa int64) (n int, err error)
}

// Region is one contiguous range of guest physical memory.
type Region struct {
	GPA      uint64 `json:"gpa"`
	Size     uint64 `json:"size"`
	ReadOnly bool   `json:"readonly,omitempty"`
	Name     string `json:"name,omitempty"`
}

// End returns the first GPA after the region.
func (r Region) End() uint64 { return r.GPA + r.Size }

// HoleError reports a guest physical address that no memory backs.
type HoleError struct {
	GPA uint64
}

func (e *HoleError) Error() string {
	return fmt.Sprintf("guest physical address %#x is not backed by guest memory", e.GPA)
}

// ErrReadOnly is returned by writes to memory that may not be written.
var ErrReadOnly = errors.New("guest memory is read-only (start kvmscope run with --allow-write)")

// InPlace is implemented by sources that read some guest RAM in place,
// from their own mapping of the memfd QEMU backs it with, rather than with
// a system call per read.
type InPlace interface {
	// MemfdRegions lists the guest RAM read in place.
	MemfdRegions() ([]Region, error)
}

// Writable reports whether writes through w may change guest memory: a
// source that can be opened read-only says so with a Writable method
// (Live, TCG without --allow-write), any other Writer writes.
func Writable(w Writer) bool {
	if a, ok := w.(interface{ Writable() bool }); ok {
		return a.Writable()
	}
	return true
}

// Capabilities say what a source can do beyond ReadAt.
type Capabilities struct {
	// Batch: many reads in one call (BatchReader).
	Batch bool `json:"batch"`
	// Write: guest memory may be written (Writer, and writes allowed).
	Write bool `json:"write"`
	// InPlace lists the guest RAM read in place from a memfd mapping.
	InPlace []Region `json:"in_place,omitempty"`
}

// CapabilitiesOf reports what src can do.
func CapabilitiesOf(src Memory) Capabilities {
	var c Capabilities
	if b, ok := src.(BatchReader); ok {
		c.Batch = true
		// A wrapper batches only when what it wraps does.
		if w, ok := b.(interface{ Batched() bool }); ok {
			c.Batch = w.Batched()
		}
	}
	if w, ok := src.(Writer); ok {
		c.Write = Writable(w)
	}
	if ip, ok := src.(InPlace); ok {
		c.InPlace, _ = ip.MemfdRegions()
	}
	return c
}
