package gdbstub

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"strconv"
)

// Reg is one register of the target description: its number for `p`/`P`
// and its size.
type Reg struct {
	Name  string
	Num   int
	Bytes int
}

// Layout is the target's registers by name, as target.xml numbers them.
type Layout struct {
	Arch string
	regs map[string]Reg
}

// Reg returns the register name, if the target has it.
func (l *Layout) Reg(name string) (Reg, bool) {
	r, ok := l.regs[name]
	return r, ok
}

// Limits of a target description: QEMU's x86-64 one is two files of a
// few KiB with about 60 registers.
const (
	maxXMLBytes  = 1 << 18
	maxXMLFiles  = 16
	maxRegisters = 1024
	xferChunk    = 0xf00 // under QEMU's 4 KiB packet buffer, hex or not
)

// readLayout reads target.xml and the files it includes (qXfer
// features) and numbers the registers as GDB does: in document order,
// from 0, a regnum attribute restarting the count.
func readLayout(ctx context.Context, c *Conn) (*Layout, error) {
	l := &Layout{regs: map[string]Reg{}}
	next := 0
	queue := []string{"target.xml"}
	seen := map[string]bool{}
	for len(queue) > 0 {
		name := queue[0]
		queue = queue[1:]
		if seen[name] {
			continue
		}
		if seen[name] = true; len(seen) > maxXMLFiles {
			return nil, fmt.Errorf("gdbstub: target description: more than %d files", maxXMLFiles)
		}
		doc, err := c.xfer(ctx, name)
		if err != nil {
			return nil, err
		}
		includes, err := l.parse(doc, &next)
		if err != nil {
			return nil, fmt.Errorf("gdbstub: %s: %w", name, err)
		}
		// Included files come where the include is; QEMU's target.xml
		// includes only, so reading them after the including file keeps
		// the order.
		queue = append(includes, queue...)
	}
	if len(l.regs) == 0 {
		return nil, fmt.Errorf("gdbstub: the target description lists no registers")
	}
	return l, nil
}

// xfer reads one file of the target description
// (qXfer:features:read:NAME:OFF,LEN; 'm' more follows, 'l' last).
func (c *Conn) xfer(ctx context.Context, name string) ([]byte, error) {
	var doc []byte
	for {
		reply, err := c.Command(ctx, fmt.Sprintf("qXfer:features:read:%s:%x,%x", name, len(doc), xferChunk))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", name, err)
		}
		if reply == "" || (reply[0] != 'm' && reply[0] != 'l') {
			return nil, fmt.Errorf("gdbstub: read %s: reply %.40q", name, reply)
		}
		doc = append(doc, reply[1:]...)
		if len(doc) > maxXMLBytes {
			return nil, fmt.Errorf("gdbstub: %s is longer than %d bytes", name, maxXMLBytes)
		}
		if reply[0] == 'l' || len(reply) == 1 {
			return doc, nil
		}
	}
}

// parse adds the registers of one description file, numbering from
// *next, and returns the files it includes.
func (l *Layout) parse(doc []byte, next *int) (includes []string, err error) {
	d := xml.NewDecoder(bytes.NewReader(doc))
	d.Strict = false
	for {
		tok, err := d.Token()
		if err != nil {
			break // io.EOF, or the rest is not XML: what was read stands
		}
		se, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		attr := func(name string) string {
			for _, a := range se.Attr {
				if a.Name.Local == name {
					return a.Value
				}
			}
			return ""
		}
		switch se.Name.Local {
		case "architecture":
			var s string
			if err := d.DecodeElement(&s, &se); err == nil && len(s) < 64 {
				l.Arch = s
			}
		case "include":
			if h := attr("href"); h != "" && len(h) < 128 {
				includes = append(includes, h)
			}
		case "reg":
			name := attr("name")
			bits, err := strconv.Atoi(attr("bitsize"))
			if name == "" || len(name) > 64 || err != nil || bits <= 0 || bits%8 != 0 || bits > 4096 {
				return nil, fmt.Errorf("register %.64q: bad bitsize %q", name, attr("bitsize"))
			}
			if rn := attr("regnum"); rn != "" {
				n, err := strconv.Atoi(rn)
				if err != nil || n < 0 || n > maxRegisters {
					return nil, fmt.Errorf("register %q: bad regnum %q", name, rn)
				}
				*next = n
			}
			if len(l.regs) >= maxRegisters {
				return nil, fmt.Errorf("more than %d registers", maxRegisters)
			}
			if _, dup := l.regs[name]; !dup {
				l.regs[name] = Reg{Name: name, Num: *next, Bytes: bits / 8}
			}
			*next++
		}
	}
	return includes, nil
}

// ReadReg reads register r of thread (`Hg`, `p`): the raw bytes, in the
// target's order (little-endian on x86).
func (c *Conn) ReadReg(ctx context.Context, thread int, r Reg) ([]byte, error) {
	if err := c.selectThread(ctx, thread); err != nil {
		return nil, err
	}
	reply, err := c.Command(ctx, fmt.Sprintf("p%x", r.Num))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.Name, err)
	}
	b, err := decodeHex([]byte(reply))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.Name, err)
	}
	if len(b) != r.Bytes {
		return nil, fmt.Errorf("gdbstub: %s: %d bytes, target.xml says %d", r.Name, len(b), r.Bytes)
	}
	return b, nil
}

// WriteReg writes register r of thread (`Hg`, `P`).
func (c *Conn) WriteReg(ctx context.Context, thread int, r Reg, val []byte) error {
	if len(val) != r.Bytes {
		return fmt.Errorf("gdbstub: write %s: %d bytes, the register has %d", r.Name, len(val), r.Bytes)
	}
	if err := c.selectThread(ctx, thread); err != nil {
		return err
	}
	if err := c.ok(ctx, fmt.Sprintf("P%x=%s", r.Num, hex.EncodeToString(val))); err != nil {
		return fmt.Errorf("write %s: %w", r.Name, err)
	}
	return nil
}

// U64 is a register value of up to 8 bytes, little-endian.
func U64(b []byte) uint64 {
	var w [8]byte
	copy(w[:], b)
	return binary.LittleEndian.Uint64(w[:])
}

// PutU64 is v in n little-endian bytes (n ≤ 8).
func PutU64(v uint64, n int) []byte {
	var w [8]byte
	binary.LittleEndian.PutUint64(w[:], v)
	return append([]byte(nil), w[:min(n, 8)]...)
}
