package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf/btf"
)

// A kernel built with CONFIG_DEBUG_INFO_BTF carries its own type
// information in .BTF, between the symbols __start_BTF and __stop_BTF
// (Documentation/bpf/btf.rst). It starts with struct btf_header:
//
//	u16 magic (0xeB9F)  u8 version (1)  u8 flags
//	u32 hdr_len  u32 type_off  u32 type_len  u32 str_off  u32 str_len
//
// with the offsets relative to the end of the header.

// ErrNoBTF is returned by BTF lookups on a kernel that has no BTF.
var ErrNoBTF = errors.New("kernel has no BTF")

const (
	btfMagic     = 0xeb9f
	btfHeaderLen = 24
	// maxBTF bounds the BTF read from guest memory; vmlinux BTF is a few
	// MiB (6.1 Debian: 4 MiB).
	maxBTF = 64 << 20
	// maxMemberDepth bounds the walk through nested anonymous members.
	maxMemberDepth = 32
)

// btfHeader is the start of a raw BTF blob, little-endian.
var btfHeader = []byte{0x9f, 0xeb, 1, 0, btfHeaderLen, 0, 0, 0}

// btfSize checks the header at the start of b and returns the size of
// the blob it describes.
func btfSize(b []byte) (int, error) {
	if len(b) < btfHeaderLen || !bytes.HasPrefix(b, btfHeader) {
		return 0, errors.New("BTF: no header")
	}
	typeOff := uint64(binary.LittleEndian.Uint32(b[8:]))
	typeLen := uint64(binary.LittleEndian.Uint32(b[12:]))
	strOff := uint64(binary.LittleEndian.Uint32(b[16:]))
	strLen := uint64(binary.LittleEndian.Uint32(b[20:]))
	size := btfHeaderLen + max(typeOff+typeLen, strOff+strLen)
	if typeLen == 0 || strLen == 0 || size > maxBTF {
		return 0, fmt.Errorf("BTF: implausible header (types %d+%d, strings %d+%d)", typeOff, typeLen, strOff, strLen)
	}
	return int(size), nil
}

// carveBTF finds the first well-formed BTF blob in b by its header.
func carveBTF(b []byte) ([]byte, error) {
	for off := 0; off < len(b); {
		i := bytes.Index(b[off:], btfHeader)
		if i < 0 {
			break
		}
		off += i
		if n, err := btfSize(b[off:]); err == nil && off+n <= len(b) {
			return b[off : off+n], nil
		}
		off++
	}
	return nil, fmt.Errorf("BTF header: %w", ErrNotFound)
}

// loadBTF reads and parses the kernel's BTF, when it has one.
func (k *Kernel) loadBTF() error {
	var raw []byte
	from := "__start_BTF"
	start, ok1 := k.Symbol("__start_BTF")
	stop, ok2 := k.Symbol("__stop_BTF")
	switch {
	case ok1 && ok2:
		if stop <= start || stop-start > maxBTF {
			return fmt.Errorf("__start_BTF %#x .. __stop_BTF %#x: implausible", start, stop)
		}
		raw = make([]byte, stop-start)
		if err := k.ReadVirt(raw, start); err != nil {
			return fmt.Errorf("read BTF: %w", err)
		}
		if _, err := btfSize(raw); err != nil {
			return fmt.Errorf("at __start_BTF %#x: %w", start, err)
		}
	case ok1 || ok2:
		return errors.New("only one of __start_BTF, __stop_BTF in kallsyms")
	default:
		// No data symbols (CONFIG_KALLSYMS_ALL off): look for the header
		// in the image.
		img, err := k.imageBytes()
		if err != nil {
			return err
		}
		from = "image scan"
		if raw, err = carveBTF(img); err != nil {
			k.logf("BTF: none in the image")
			return nil
		}
	}
	spec, err := btf.LoadSpecFromReader(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("parse %d bytes of BTF: %w", len(raw), err)
	}
	k.BTF = spec
	k.Found["btf"] = from
	k.logf("BTF: %d bytes (%s)", len(raw), from)
	return nil
}

// structType returns the struct or union named name.
func (k *Kernel) structType(name string) (btf.Type, error) {
	if k.BTF == nil {
		return nil, ErrNoBTF
	}
	var s *btf.Struct
	err := k.BTF.TypeByName(name, &s)
	if err == nil {
		return s, nil
	}
	var u *btf.Union
	if err2 := k.BTF.TypeByName(name, &u); err2 == nil {
		return u, nil
	}
	return nil, fmt.Errorf("BTF: struct %s: %w", name, err)
}

// TypeSize returns sizeof(struct structName) from BTF.
func (k *Kernel) TypeSize(structName string) (uint32, error) {
	t, err := k.structType(structName)
	if err != nil {
		return 0, err
	}
	sz, err := btf.Sizeof(t)
	if err != nil {
		return 0, fmt.Errorf("BTF: sizeof(struct %s): %w", structName, err)
	}
	return uint32(sz), nil
}

// MemberOffset returns the byte offset of member in struct (or union)
// structName, from BTF. member may be a dotted path through embedded
// structs ("se.vruntime", "signal" is a pointer and ends a path), and
// members of anonymous structs and unions are found by their own name,
// as C does.
func (k *Kernel) MemberOffset(structName, member string) (uint32, error) {
	t, err := k.structType(structName)
	if err != nil {
		return 0, err
	}
	return memberOffset(t, member)
}

// memberOffset resolves a dotted member path in t.
func memberOffset(t btf.Type, path string) (uint32, error) {
	var bits uint64
	for part := range strings.SplitSeq(path, ".") {
		c := btf.UnderlyingType(t)
		if _, ok := members(c); !ok {
			return 0, fmt.Errorf("BTF: %q: %s is not a struct or union", path, t.TypeName())
		}
		m, off, err := findMember(c, part, 0)
		if err != nil {
			return 0, fmt.Errorf("BTF: %q: %w", path, err)
		}
		if m.BitfieldSize != 0 {
			return 0, fmt.Errorf("BTF: %q: %s is a bitfield", path, part)
		}
		bits += off
		t = m.Type
	}
	if bits%8 != 0 || bits/8 > 1<<31 {
		return 0, fmt.Errorf("BTF: %q: bit offset %d", path, bits)
	}
	return uint32(bits / 8), nil
}

// findMember finds name among c's members, descending into anonymous
// structs and unions; the offset is in bits from the start of c.
func findMember(c btf.Type, name string, depth int) (btf.Member, uint64, error) {
	if depth > maxMemberDepth {
		return btf.Member{}, 0, errors.New("anonymous members nested too deep")
	}
	ms, _ := members(c)
	for _, m := range ms {
		if m.Name == name {
			return m, uint64(m.Offset), nil
		}
	}
	for _, m := range ms {
		if m.Name != "" {
			continue
		}
		inner := btf.UnderlyingType(m.Type)
		if _, ok := members(inner); !ok {
			continue
		}
		if f, off, err := findMember(inner, name, depth+1); err == nil {
			return f, uint64(m.Offset) + off, nil
		}
	}
	return btf.Member{}, 0, fmt.Errorf("no member %s in %s", name, c.TypeName())
}

// members returns the members of a struct or union.
func members(t btf.Type) ([]btf.Member, bool) {
	switch t := t.(type) {
	case *btf.Struct:
		return t.Members, true
	case *btf.Union:
		return t.Members, true
	}
	return nil, false
}
