package introspect

import "errors"

// Kallsyms is the kernel's symbol table as read from guest memory.
type Kallsyms struct {
	names []string
	addrs []uint64
}

// Len returns the number of symbols.
func (s *Kallsyms) Len() int { return len(s.names) }

// Lookup returns the address of the symbol name.
func (s *Kallsyms) Lookup(name string) (uint64, bool) {
	return 0, false
}

// At returns the symbol containing va and the offset of va into it.
func (s *Kallsyms) At(va uint64) (name string, off uint64, ok bool) {
	return "", 0, false
}

var errKallsymsTODO = errors.New("kallsyms: not implemented yet")
