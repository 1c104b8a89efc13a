package api

import (
	"strconv"
	"unicode/utf8"

	"github.com/kvmscope/kvmscope/introspect"
)

// appendProcess appends p as JSON, byte for byte what encoding/json makes
// of Process{p, PGD, Task} (TestAppendProcess and FuzzAppendProcess hold
// it to that), without reflection: a list of 5,000 processes costs a
// fifth of the time.
func appendProcess(b []byte, p *introspect.Process) []byte {
	num := func(key string, v int64) {
		b = append(b, key...)
		b = strconv.AppendInt(b, v, 10)
	}
	b = append(b, `{"pid":`...)
	b = strconv.AppendInt(b, int64(p.PID), 10)
	num(`,"tgid":`, int64(p.TGID))
	num(`,"ppid":`, int64(p.PPID))
	num(`,"uid":`, int64(p.UID))
	num(`,"gid":`, int64(p.GID))
	num(`,"euid":`, int64(p.EUID))
	num(`,"egid":`, int64(p.EGID))
	b = append(b, `,"comm":`...)
	b = appendJSONString(b, p.Comm)
	b = append(b, `,"state":`...)
	b = appendJSONString(b, p.State)
	b = append(b, `,"kthread":`...)
	b = strconv.AppendBool(b, p.KThread)
	num(`,"threads":`, int64(p.Threads))
	b = append(b, `,"start_time_ns":`...)
	b = strconv.AppendUint(b, p.StartTime, 10)
	if len(p.Cmdline) > 0 {
		b = append(b, `,"cmdline":[`...)
		for i, a := range p.Cmdline {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, a)
		}
		b = append(b, ']')
	}
	if p.PGD != 0 {
		b = append(b, `,"pgd":"0x`...)
		b = strconv.AppendUint(b, p.PGD, 16)
		b = append(b, '"')
	}
	b = append(b, `,"task":"0x`...)
	b = strconv.AppendUint(b, p.Task, 16)
	return append(b, `"}`...)
}

// appendJSONString appends s quoted as encoding/json quotes it (with its
// default HTML escaping): comm and command lines come from the guest and
// may hold any bytes.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' && c != '<' && c != '>' && c != '&' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\b':
				b = append(b, '\\', 'b')
			case '\f':
				b = append(b, '\\', 'f')
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hex[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
