package introspect

import (
	"fmt"
	"strings"
)

// PartialError is returned together with the results read before damage:
// a kernel list whose links break (a node's prev does not lead back, a
// cycle that never returns to the head, an unreadable node, more nodes
// than the bound). The results returned with it are the ones read before
// the break; Warnings say, one per damage, where the walk stopped and why.
// A list an attacker edited to hide an object reads the same as a list
// damaged by accident: both are data, not a reason to return nothing.
type PartialError struct{ Warnings []string }

func (e *PartialError) Error() string {
	switch len(e.Warnings) {
	case 0:
		return "partial result"
	case 1:
		return "partial result: " + e.Warnings[0]
	}
	return fmt.Sprintf("partial result (%d problems): %s", len(e.Warnings), strings.Join(e.Warnings, "; "))
}

// add records one damage.
func (e *PartialError) add(format string, args ...any) {
	e.Warnings = append(e.Warnings, fmt.Sprintf(format, args...))
}

// orNil returns e when it holds a warning, else nil (an untyped nil, so
// that err != nil means damage).
func (e *PartialError) orNil() error {
	if e == nil || len(e.Warnings) == 0 {
		return nil
	}
	return e
}

// walkList walks the circular list whose head is at head as listNodes
// does, but keeps the nodes read before any damage: it returns them and a
// description of the damage ("" when the list is whole). budget errors
// (ErrBudget) are returned as err; nothing else is.
func walkList(k *Kernel, head uint64, limit int, budget *int) (nodes []uint64, damage string, err error) {
	seen := make(map[uint64]bool)
	prev := head
	cur, rerr := k.ReadU64(head)
	if rerr != nil {
		return nil, fmt.Sprintf("list at %#x: %v", head, rerr), nil
	}
	for cur != head {
		if len(nodes) >= limit {
			return nodes, fmt.Sprintf("list at %#x: more than %d nodes", head, limit), nil
		}
		if !k.kernelPtr(cur) {
			return nodes, fmt.Sprintf("list at %#x: node %d: %#x is not a kernel address", head, len(nodes), cur), nil
		}
		if seen[cur] {
			return nodes, fmt.Sprintf("list at %#x: node %#x appears twice (the list does not lead back to its head)", head, cur), nil
		}
		seen[cur] = true
		if budget != nil {
			if *budget--; *budget < 0 {
				return nil, "", ErrBudget
			}
		}
		var b [16]byte
		if err := k.ReadVirt(b[:], cur); err != nil {
			return nodes, fmt.Sprintf("list at %#x: node %d: %v", head, len(nodes), err), nil
		}
		if p := le64(b[:], 8); p != prev {
			return nodes, fmt.Sprintf("list at %#x: node %#x: prev is %#x, want %#x", head, cur, p, prev), nil
		}
		nodes = append(nodes, cur)
		prev, cur = cur, le64(b[:], 0)
	}
	if p, err := k.ReadU64(head + 8); err != nil || p != prev {
		return nodes, fmt.Sprintf("list at %#x: head's prev %#x is not the last node %#x", head, p, prev), nil
	}
	return nodes, "", nil
}
