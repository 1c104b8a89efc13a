// Package gdbstub is a small client of the GDB remote serial protocol as
// QEMU's gdbstub serves it (gdb/doc "Remote Protocol"; QEMU gdbstub.c):
// packets with checksums and acks, the stop reply, registers by number
// (`p`/`P`) as target.xml lays them out, thread selection (`Hg`/`Hc`),
// breakpoints (`Z1`/`z1`), continue, step and interrupt. Everything it
// reads from QEMU is bounded: a packet is at most MaxPacket bytes.
package gdbstub

import (
	"bufio"
	"errors"
	"fmt"
)

// MaxPacket bounds one packet's payload, decoded. QEMU's own buffer is
// 4 KiB (MAX_PACKET_LENGTH); target.xml comes in chunks we ask for.
const MaxPacket = 1 << 16

// ErrPacket is a malformed packet.
var ErrPacket = errors.New("gdbstub: malformed packet")

// checksum is the protocol's: the sum of the payload bytes modulo 256.
func checksum(b []byte) byte {
	var s byte
	for _, c := range b {
		s += c
	}
	return s
}

// encode frames payload as $payload#cs, escaping the bytes the protocol
// reserves ('#', '$', '}', '*').
func encode(payload string) []byte {
	body := make([]byte, 0, len(payload)+4)
	for i := 0; i < len(payload); i++ {
		c := payload[i]
		if c == '#' || c == '$' || c == '}' || c == '*' {
			body = append(body, '}', c^0x20)
			continue
		}
		body = append(body, c)
	}
	out := append([]byte{'$'}, body...)
	return fmt.Appendf(out, "#%02x", checksum(body))
}

// readPacket reads bytes from r until a whole packet: acks ('+', '-')
// and stray bytes before '$' are skipped, at most MaxPacket raw bytes
// are read for the body, and the checksum is checked over the raw body.
// The payload is returned decoded (escapes and run-length encoding).
// A checksum mismatch returns ErrChecksum (the caller sends '-').
func readPacket(r *bufio.Reader) ([]byte, error) {
	skipped := 0
	for {
		c, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		if c == '$' {
			break
		}
		// '+'/'-' acks, and a 0x03 echo; anything else is noise, bounded.
		if skipped++; skipped > MaxPacket {
			return nil, fmt.Errorf("%w: no packet start in %d bytes", ErrPacket, skipped)
		}
	}
	var raw []byte
	for {
		c, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		if c == '#' {
			break
		}
		if c == '$' {
			// A new packet started: the one before was cut off.
			raw = raw[:0]
			continue
		}
		if len(raw) >= 2*MaxPacket {
			return nil, fmt.Errorf("%w: longer than %d bytes", ErrPacket, 2*MaxPacket)
		}
		raw = append(raw, c)
	}
	var cs [2]byte
	for i := range cs {
		c, err := r.ReadByte()
		if err != nil {
			return nil, err
		}
		cs[i] = c
	}
	want, ok := hexByte(cs[0], cs[1])
	if !ok {
		return nil, fmt.Errorf("%w: checksum %q is not hex", ErrPacket, cs[:])
	}
	if checksum(raw) != want {
		return nil, ErrChecksum
	}
	return decodeBody(raw)
}

// ErrChecksum is a packet whose checksum does not match its body.
var ErrChecksum = errors.New("gdbstub: packet checksum mismatch")

// decodeBody undoes escapes ('}' x^0x20) and run-length encoding ('*'
// followed by count+29 repeats the byte before), bounded by MaxPacket.
func decodeBody(raw []byte) ([]byte, error) {
	out := make([]byte, 0, len(raw))
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch c {
		case '}':
			if i+1 >= len(raw) {
				return nil, fmt.Errorf("%w: escape at the end", ErrPacket)
			}
			i++
			out = append(out, raw[i]^0x20)
		case '*':
			if len(out) == 0 || i+1 >= len(raw) {
				return nil, fmt.Errorf("%w: bad run-length encoding", ErrPacket)
			}
			i++
			n := int(raw[i]) - 29
			if n < 0 {
				return nil, fmt.Errorf("%w: bad run-length count", ErrPacket)
			}
			prev := out[len(out)-1]
			for range n {
				out = append(out, prev)
			}
		default:
			out = append(out, c)
		}
		if len(out) > MaxPacket {
			return nil, fmt.Errorf("%w: longer than %d bytes", ErrPacket, MaxPacket)
		}
	}
	return out, nil
}

func hexNibble(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

func hexByte(hi, lo byte) (byte, bool) {
	h, ok1 := hexNibble(hi)
	l, ok2 := hexNibble(lo)
	return h<<4 | l, ok1 && ok2
}

// decodeHex decodes a hex string of whole bytes.
func decodeHex(s []byte) ([]byte, error) {
	if len(s)%2 != 0 {
		return nil, fmt.Errorf("%w: odd hex length %d", ErrPacket, len(s))
	}
	out := make([]byte, len(s)/2)
	for i := range out {
		b, ok := hexByte(s[2*i], s[2*i+1])
		if !ok {
			return nil, fmt.Errorf("%w: not hex: %q", ErrPacket, s[2*i:2*i+2])
		}
		out[i] = b
	}
	return out, nil
}
