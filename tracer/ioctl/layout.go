package ioctl

import (
	"encoding/binary"
	"fmt"
)

// layout says where a request's fields are: in the argument's value, or
// in the struct the argument points to (x86-64 layouts, little endian, as
// in include/uapi/linux/kvm.h).
type layout struct {
	pointer bool
	size    int // bytes of the struct read at the pointer (without entries)
	fields  []fieldSpec
	entries *entries // the struct's trailing array, if a field is a list
}

// fieldSpec is one field: size bytes at off, then shift and bits for
// fields packed into a word (the address space in a memslot's slot).
type fieldSpec struct {
	name, doc string
	off, size int
	shift     uint
	bits      uint // 0: the whole word
	names     map[string]uint64
	list      *listField
}

// listField is a field read from every element of the layout's entries.
type listField struct{ off, size int }

// entries is a struct's array: count elements (a fixed count, or the value
// of field countField) of stride bytes at off. max is the kernel's own
// limit for the count: a call above it fails in the kernel anyway, and
// reading it would let QEMU make the tracer read without bound.
type entries struct {
	off, stride int
	count       int
	countField  string
	max         uint64
}

// maxStruct bounds the bytes read for a struct's fixed part.
const maxStruct = 64

func (l *layout) decode(arg uint64, m Memory, a *Args) error {
	var buf [maxStruct]byte
	hdr := buf[:8]
	if l.pointer {
		hdr = buf[:l.size]
		if err := read(m, hdr, arg, 0); err != nil {
			return err
		}
	} else {
		binary.LittleEndian.PutUint64(hdr, arg)
	}
	for i, f := range l.fields {
		if f.list == nil {
			a.vals[i] = f.value(hdr)
		}
	}
	if l.entries == nil {
		return nil
	}
	e := l.entries
	n := uint64(e.count)
	if e.countField != "" {
		for i, f := range l.fields {
			if f.name == e.countField {
				n = a.vals[i]
			}
		}
		if n > e.max {
			return fmt.Errorf("%s is %d, above the kernel's limit of %d", e.countField, n, e.max)
		}
	}
	body := make([]byte, int(n)*e.stride)
	if err := read(m, body, arg, e.off); err != nil {
		return err
	}
	for i, f := range l.fields {
		if f.list == nil {
			continue
		}
		vals := make([]uint64, n)
		for j := range vals {
			vals[j] = word(body[j*e.stride+f.list.off:], f.list.size)
		}
		a.lists[i] = vals
	}
	return nil
}

// read reads len(b) bytes at arg+off, refusing an address range that
// wraps around.
func read(m Memory, b []byte, arg uint64, off int) error {
	if len(b) == 0 {
		return nil
	}
	addr := arg + uint64(off)
	if addr < arg || addr+uint64(len(b)) < addr {
		return fmt.Errorf("argument %#x: address range wraps", arg)
	}
	if err := m.ReadAt(b, addr); err != nil {
		return fmt.Errorf("read %d bytes at %#x: %w", len(b), addr, err)
	}
	return nil
}

func (f *fieldSpec) value(b []byte) uint64 {
	v := word(b[f.off:], f.size)
	if f.bits != 0 {
		v = v >> f.shift & (1<<f.bits - 1)
	}
	return v
}

func word(b []byte, size int) uint64 {
	switch size {
	case 1:
		return uint64(b[0])
	case 2:
		return uint64(binary.LittleEndian.Uint16(b))
	case 4:
		return uint64(binary.LittleEndian.Uint32(b))
	}
	return binary.LittleEndian.Uint64(b)
}

// Constructors for the catalogue's fields.

func u32(name string, off int, doc string) fieldSpec {
	return fieldSpec{name: name, doc: doc, off: off, size: 4}
}

func u64(name string, off int, doc string) fieldSpec {
	return fieldSpec{name: name, doc: doc, off: off, size: 8}
}

// value is a field that is the argument itself.
func value(name, doc string) *layout {
	return &layout{fields: []fieldSpec{u64(name, 0, doc)}}
}

// ptr is a layout read through the argument: size bytes of struct.
func ptr(size int, fields ...fieldSpec) *layout {
	return &layout{pointer: true, size: size, fields: fields}
}

func (f fieldSpec) named(names map[string]uint64) fieldSpec {
	f.names = names
	return f
}

func (f fieldSpec) packed(shift, bits uint) fieldSpec {
	f.shift, f.bits = shift, bits
	return f
}

// listOf makes f a list field at off inside each entry.
func (f fieldSpec) listOf(off int) fieldSpec {
	f.list = &listField{off: off, size: f.size}
	return f
}

func (l *layout) with(e entries) *layout {
	l.entries = &e
	return l
}
