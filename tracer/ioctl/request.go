// Package ioctl is the catalogue of the ioctl requests QEMU issues: their
// numbers, the kind of fd each is issued on, and decoders for the fields
// of their arguments, read from the caller's memory. The policy
// (tracer/policy) matches rules against these fields; the tracer decodes
// each trapped call at most once.
//
// The decoders read hostile memory: every read is bounded by the layout
// of the kernel's struct (and, for lists, by the kernel's own limit), and
// a failed read is an error, never a guess.
package ioctl

//go:generate bash mknumbers.sh

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// FD is the kind of file descriptor a request is issued on.
type FD string

const (
	FDKVM    FD = "kvm"    // /dev/kvm
	FDVM     FD = "vm"     // anon_inode:kvm-vm
	FDVCPU   FD = "vcpu"   // anon_inode:kvm-vcpu:N
	FDDevice FD = "device" // a KVM_CREATE_DEVICE fd (anon_inode:kvm-vfio, ...)
	FDAny    FD = ""       // not a KVM request, or issued on several kinds
)

// Memory is the calling process's memory (QEMU's), where pointer arguments
// point. ReadAt fills b from address addr or fails; it may read a value
// that another thread changes at the same time (see docs/policy.md).
type Memory interface {
	ReadAt(b []byte, addr uint64) error
}

// Field is one decoded field of a request's argument.
type Field struct {
	Name string // as in the kernel's struct, e.g. "guest_phys_addr"
	Doc  string // one line for docs/ioctl-fields.md
	// List is set for fields with several values (the MSR indices of
	// KVM_SET_MSRS); a condition holds when it holds for any of them.
	List bool
	// Names are the symbolic values a condition may use for this field
	// (KVM_CAP_*, KVM_DEV_TYPE_*, KVM_GUESTDBG_*, KVM_MEM_*).
	Names map[string]uint64
}

// Request is one ioctl request.
type Request struct {
	Name string // KVM_CREATE_VCPU
	Cmd  uint32 // its number
	FD   FD     // the fd kind it is issued on (FDAny when not a KVM request)
	// Fields are the decoded fields of the argument, besides "arg" (the
	// raw third argument), which every request has.
	Fields []Field
	// Pointer is set when the fields are read through the argument as a
	// pointer into the caller's memory (rather than being the argument's
	// value itself).
	Pointer bool

	layout *layout
}

// maxFields bounds the fields of one request (checked at init).
const maxFields = 8

// Args are the decoded fields of one call.
type Args struct {
	req   *Request
	arg   [1]uint64
	ok    bool // the fields were decoded (else only "arg" is set)
	vals  [maxFields]uint64
	lists [maxFields][]uint64
}

// Get returns the values of field name ("arg" included) and whether the
// call has that field. Single-valued fields return one value.
func (a *Args) Get(name string) ([]uint64, bool) {
	if name == "arg" {
		return a.arg[:], true
	}
	if a.req == nil || !a.ok {
		return nil, false
	}
	for i, f := range a.req.Fields {
		if f.Name == name {
			if f.List {
				return a.lists[i], true
			}
			return a.vals[i : i+1], true
		}
	}
	return nil, false
}

// MarshalJSON writes the fields as a JSON object, single values as numbers
// and lists as arrays, for events: {"arg":140737..., "vcpu_id":2}.
func (a *Args) MarshalJSON() ([]byte, error) {
	b := append([]byte(`{"arg":`), strconv.FormatUint(a.arg[0], 10)...)
	if a.req != nil && a.ok {
		for i, f := range a.req.Fields {
			b = append(b, ",\""...)
			b = append(b, f.Name...)
			b = append(b, "\":"...)
			if !f.List {
				b = strconv.AppendUint(b, a.vals[i], 10)
				continue
			}
			b = append(b, '[')
			for j, v := range a.lists[i] {
				if j > 0 {
					b = append(b, ',')
				}
				b = strconv.AppendUint(b, v, 10)
			}
			b = append(b, ']')
		}
	}
	return append(b, '}'), nil
}

// Decode decodes the call's argument: arg is the raw third argument of
// ioctl(2), m is the caller's memory. An unknown request (r == nil) or one
// without fields decodes to just "arg". On error the Args still hold
// "arg", and the error says which read failed.
func (r *Request) Decode(arg uint64, m Memory) (Args, error) {
	a := Args{req: r, arg: [1]uint64{arg}}
	if r == nil || r.layout == nil {
		return a, nil
	}
	if err := r.layout.decode(arg, m, &a); err != nil {
		a.ok = false
		return a, fmt.Errorf("%s: %w", r.Name, err)
	}
	a.ok = true
	return a, nil
}

// MemoryRegion is the argument of KVM_SET_USER_MEMORY_REGION(2), as the
// tracer's memslot table keeps it. Slot is the kernel's u32 slot: the
// address space in the high 16 bits, the slot id in the low 16.
type MemoryRegion struct {
	Slot, Flags                              uint32
	GuestPhysAddr, MemorySize, UserspaceAddr uint64
}

// MemoryRegion returns the region of a decoded KVM_SET_USER_MEMORY_REGION
// or KVM_SET_USER_MEMORY_REGION2 call (zero for any other call).
func (a *Args) MemoryRegion() MemoryRegion {
	get := func(n string) uint64 {
		if v, ok := a.Get(n); ok && len(v) == 1 {
			return v[0]
		}
		return 0
	}
	return MemoryRegion{
		Slot:          uint32(get("slot") | get("as_id")<<16),
		Flags:         uint32(get("flags")),
		GuestPhysAddr: get("guest_phys_addr"),
		MemorySize:    get("memory_size"),
		UserspaceAddr: get("userspace_addr"),
	}
}

var (
	byName = map[string]*Request{}
	byCmd  = map[uint32]*Request{}
	sorted []*Request
)

func init() {
	for i := range catalogue {
		s := &catalogue[i]
		cmd, ok := numbers[s.name]
		if !ok {
			panic("ioctl: " + s.name + " has no number; run go generate ./tracer/ioctl")
		}
		r := &Request{Name: s.name, Cmd: cmd, FD: s.fd, layout: s.layout}
		if s.layout != nil {
			if len(s.layout.fields) > maxFields {
				panic("ioctl: " + s.name + " has too many fields")
			}
			r.Pointer = s.layout.pointer
			for _, f := range s.layout.fields {
				r.Fields = append(r.Fields, Field{Name: f.name, Doc: f.doc, List: f.list != nil, Names: f.names})
			}
		}
		if byName[r.Name] != nil || byCmd[cmd] != nil {
			panic("ioctl: " + r.Name + " is in the catalogue twice")
		}
		byName[r.Name], byCmd[cmd] = r, r
		sorted = append(sorted, r)
	}
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Name < sorted[j].Name })
}

// Lookup finds a request by name (KVM_CREATE_VCPU) or number (0xae41,
// 44609). A number the catalogue does not know is found too, as a request
// named by its number with no fields.
func Lookup(name string) (*Request, bool) {
	if r, ok := byName[name]; ok {
		return r, true
	}
	n, err := strconv.ParseUint(name, 0, 64)
	if err != nil || name == "" || strings.HasPrefix(name, "-") {
		return nil, false
	}
	// Only the low 32 bits reach the kernel; QEMU passes requests as an
	// int, so 0xffffffffc008ae88 is KVM_GET_MSRS.
	if n > 0xffffffff && n < 0xffffffff80000000 {
		return nil, false
	}
	if r, ok := ByCmd(uint32(n)); ok {
		return r, true
	}
	return &Request{Name: Name(uint32(n)), Cmd: uint32(n)}, true
}

// ByCmd finds a request by number; only the low 32 bits count, as in the
// kernel (an ioctl's cmd is an unsigned int).
func ByCmd(cmd uint32) (*Request, bool) {
	r, ok := byCmd[cmd]
	return r, ok
}

// All lists the catalogue, ordered by name.
func All() []*Request { return sorted }

// Name is the request's name, or its number in hex when unknown.
func Name(cmd uint32) string {
	if r, ok := byCmd[cmd]; ok {
		return r.Name
	}
	return "0x" + strconv.FormatUint(uint64(cmd), 16)
}
