package introspect

import "errors"

// MemberOffset returns the byte offset of member in struct structName,
// following anonymous structs/unions and dotted paths ("signal.rlim").
func (k *Kernel) MemberOffset(structName, member string) (uint32, error) {
	return 0, errors.New("introspect.MemberOffset: not implemented yet")
}
