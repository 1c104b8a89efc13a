package introspect

import (
	"fmt"
	"math/bits"
	"sort"
	"strings"
)

// idrEntry is one entry of a radix tree / xarray: its index, its value
// and the address of the slot that holds it.
type idrEntry struct{ index, ptr, slot uint64 }

// walkIDR walks the radix tree (4.15..4.19) or xarray (4.20+) whose head
// pointer is at head, of the struct xarray (radix_tree_root) at array,
// and returns its pointer entries in index order. Nodes are checked by
// structure: shift one chunk less than the parent's, parent and array
// (root) pointers back to the parent and the tree, offset equal to the
// slot in the parent; a node failing a check is skipped and named in
// damage. At most maxNodes nodes are read.
func walkIDR(k *Kernel, head, array uint64, slots int64, chunk int, xarray bool, maxNodes int) ([]idrEntry, []string, error) {
	if chunk <= 1 || chunk > 256 || chunk&(chunk-1) != 0 || slots < 0 || slots > 256 {
		return nil, nil, fmt.Errorf("tree layout: %d slots at %d", chunk, slots)
	}
	step := bits.Len(uint(chunk)) - 1
	v, err := k.ReadU64(head)
	if err != nil {
		return nil, nil, fmt.Errorf("tree head at %#x: %w", head, err)
	}
	internal := func(v uint64) bool {
		if xarray {
			return v&3 == 2
		}
		return v&3 == 1
	}
	node := func(v uint64) (uint64, bool) {
		if !internal(v) || v <= 4096 || !k.kernelPtr(v) {
			return 0, false
		}
		if xarray {
			return v - 2, true
		}
		return v - 1, true
	}
	if v == 0 {
		return nil, nil, nil
	}
	root, isNode := node(v)
	if !isNode {
		if internal(v) || v&1 != 0 || !k.kernelPtr(v) {
			return nil, nil, fmt.Errorf("tree head at %#x: %#x is neither an entry nor a node", head, v)
		}
		return []idrEntry{{0, v, head}}, nil, nil
	}
	type item struct {
		node, parent uint64
		slot         int
		base         uint64
		shift        int // expected; -1 for the root
	}
	var out []idrEntry
	var damage []string
	bad := func(format string, args ...any) {
		if len(damage) < 16 {
			damage = append(damage, fmt.Sprintf(format, args...))
		}
	}
	seen := map[uint64]bool{}
	stack := []item{{node: root, shift: -1}}
	buf := make([]byte, slots+8*int64(chunk))
	for len(stack) > 0 {
		it := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if len(seen) >= maxNodes {
			bad("more than %d nodes", maxNodes)
			break
		}
		if seen[it.node] {
			bad("node %#x appears twice", it.node)
			continue
		}
		seen[it.node] = true
		if err := k.ReadVirt(buf, it.node); err != nil {
			bad("node %#x: %v", it.node, err)
			continue
		}
		shift := int(buf[0])
		switch {
		case it.shift >= 0 && shift != it.shift:
			bad("node %#x: shift %d, want %d", it.node, shift, it.shift)
			continue
		case it.shift < 0 && (shift%step != 0 || shift >= 64):
			bad("root node %#x: shift %d", it.node, shift)
			continue
		case it.shift >= 0 && int(buf[1]) != it.slot:
			bad("node %#x: offset %d, in slot %d", it.node, buf[1], it.slot)
			continue
		case le64(buf, nodeParent) != it.parent:
			bad("node %#x: parent %#x, want %#x", it.node, le64(buf, nodeParent), it.parent)
			continue
		case le64(buf, nodeArray) != array:
			bad("node %#x: tree %#x, want %#x", it.node, le64(buf, nodeArray), array)
			continue
		}
		for i := chunk - 1; i >= 0; i-- {
			e := le64(buf, int(slots)+8*i)
			if e == 0 {
				continue
			}
			idx := it.base + uint64(i)<<uint(shift)
			if shift == 0 {
				// Internal entries at the leaves are siblings,
				// retry and zero entries; value entries have bit 0.
				if internal(e) || e&1 != 0 {
					continue
				}
				if !k.kernelPtr(e) {
					bad("index %d: %#x is not a kernel address", idx, e)
					continue
				}
				if len(out) >= pidMax {
					bad("more than %d entries", pidMax)
					break
				}
				out = append(out, idrEntry{idx, e, it.node + uint64(slots) + 8*uint64(i)})
				continue
			}
			c, ok := node(e)
			if !ok {
				if !internal(e) {
					bad("node %#x slot %d: entry %#x above the leaves", it.node, i, e)
				}
				continue
			}
			stack = append(stack, item{node: c, parent: it.node, slot: i, base: idx, shift: shift - step})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].index < out[j].index })
	return out, damage, nil
}

// pidWindow bounds the bytes of struct pid read (6.1: 96 bytes; numbers
// at 80; later kernels add pidfs members before numbers).
const pidWindow = 0x100

// pidIDR runs the pid_idr view. listed are the tasks Processes lists,
// used to solve struct pid's layout without BTF.
func (x *xview) pidIDR(listed *taskSet) (ViewResult, *taskSet) {
	vr := ViewResult{Name: ViewPidIDR}
	k := x.k
	ns, ok := k.Symbol("init_pid_ns")
	if !ok {
		vr.Reason = "kallsyms has no init_pid_ns (a kernel without CONFIG_KALLSYMS_ALL)"
		return vr, nil
	}
	if k.Version.Major != 0 && !k.Version.AtLeast(4, 15) {
		vr.Reason = fmt.Sprintf("kernel %v allocates pids from a bitmap (pidmap), not an IDR (4.15+)", k.Version)
		return vr, nil
	}
	if k.BTF != nil {
		if err := k.pidViewFromBTF(&x.v); err != nil {
			vr.Reason = "offsets: " + err.Error()
			return vr, nil
		}
	} else {
		x.v.xaHead = solved(xaHeadDefault, "struct pid_namespace begins with its idr, whose radix tree root holds its head after lock and flags (4.15+ layout); checked by the walk: every node's tree pointer leads back to the root")
		x.v.nodeSlots = solved(nodeSlotsDefault, "xa_node layout (shift, offset, count, nr_values, parent, array, private_list, slots); checked by the walk: every node's parent, slot offset and tree pointers")
		x.v.chunk = chunkDefault
	}
	xarray := k.Version.Major == 0 || k.Version.AtLeast(4, 20)
	head := ns + uint64(x.v.xaHead.Value)
	entries, damage, err := walkIDR(k, head, head-8, x.v.nodeSlots.Value, x.v.chunk, xarray, maxIDRNodes)
	if err != nil {
		vr.Reason = "init_pid_ns.idr: " + err.Error()
		return vr, nil
	}
	if k.BTF == nil {
		if err := x.solvePidLayout(ns, entries, listed); err != nil {
			vr.Reason = "struct pid layout (no BTF): " + err.Error()
			return vr, nil
		}
	}
	set := newTaskSet()
	mism := 0
	for _, e := range entries {
		b := make([]byte, max(x.v.pidTasks.Value, x.v.pidNumbers.Value)+16)
		if err := k.ReadVirt(b, e.ptr); err != nil {
			damage = append(damage, fmt.Sprintf("pid %d: struct pid at %#x: %v", e.index, e.ptr, err))
			continue
		}
		if nr := le32(b, int(x.v.pidNumbers.Value)); uint64(nr) != e.index {
			if mism++; mism <= 4 {
				damage = append(damage, fmt.Sprintf("index %d: struct pid at %#x holds nr %d", e.index, e.ptr, nr))
			}
			continue
		}
		first := le64(b, int(x.v.pidTasks.Value))
		if first == 0 {
			continue // a pid still used as a process group or session id
		}
		if !k.kernelPtr(first) {
			damage = append(damage, fmt.Sprintf("pid %d: task link %#x", e.index, first))
			continue
		}
		task := first - uint64(x.v.pidLinks.Value)
		t := x.info(task)
		if !t.ok {
			damage = append(damage, fmt.Sprintf("pid %d: task at %#x: %v", e.index, task, t.readErr))
			continue
		}
		if t.pid != int(e.index) {
			damage = append(damage, fmt.Sprintf("pid %d: task at %#x has pid %d", e.index, task, t.pid))
		}
		set.add(task)
		if len(set.order) > maxTasks {
			damage = append(damage, fmt.Sprintf("more than %d tasks", maxTasks))
			break
		}
	}
	vr.Ran, vr.Count = true, len(set.order)
	if len(damage) > 0 {
		vr.Reason = "damaged: " + strings.Join(damage, "; ")
	}
	return vr, set
}

// solvePidLayout finds struct pid's numbers and tasks and
// task_struct.pid_links without BTF, from the allocator's entries and the
// listed tasks:
//
//   - pid.numbers: the offset where every entry holds its own index
//     (numbers[0].nr) followed by a pointer to init_pid_ns
//     (numbers[0].ns);
//   - pid.tasks and task_struct.pid_links: in the entry of each listed
//     task's pid, a pointer (tasks[PIDTYPE_PID].first) to a fixed offset
//     L inside that task (pid_links[PIDTYPE_PID]), whose pprev at L+8
//     points back to it. tasks[PIDTYPE_TGID] of a group leader passes too
//     (at the next slot, L+16), not on other threads; the lowest pair is
//     PIDTYPE_PID, first in both arrays.
func (x *xview) solvePidLayout(ns uint64, entries []idrEntry, listed *taskSet) error {
	k := x.k
	if len(entries) < 3 {
		return fmt.Errorf("only %d pids allocated", len(entries))
	}
	byIndex := map[uint64]uint64{}
	imgs := map[uint64][]byte{}
	for i, e := range entries {
		byIndex[e.index] = e.ptr
		if i < 4096 {
			b, err := readUpTo(k, e.ptr, pidWindow)
			if err != nil || len(b) < pidWindow {
				continue
			}
			imgs[e.ptr] = b
		}
	}
	var nums []candidate
	for n := 8; n+16 <= pidWindow; n += 8 {
		ok := true
		for _, e := range entries {
			b := imgs[e.ptr]
			if b == nil {
				continue
			}
			if uint64(le32(b, n)) != e.index || le64(b, n+8) != ns {
				ok = false
				break
			}
		}
		if ok {
			nums = append(nums, candidate{off: n})
		}
	}
	nc, err := one("pid.numbers", nums)
	if err != nil {
		return err
	}
	type sample struct {
		task, pidAddr uint64
		pid           []byte
	}
	var ss []sample
	total := 0
	for _, a := range listed.order {
		t := x.info(a)
		if !t.ok || t.pid <= 0 {
			continue
		}
		total++
		if p, ok := byIndex[uint64(t.pid)]; ok && imgs[p] != nil {
			ss = append(ss, sample{a, p, imgs[p]})
		}
	}
	// Half suffices: the pprev check is strong, and a rootkit that takes
	// many pids out of the allocator must not stop the view that would
	// name them.
	if len(ss) < 3 || len(ss)*2 < total {
		return fmt.Errorf("only %d of %d listed tasks have their pid in the allocator", len(ss), total)
	}
	var links []candidate
	for a := 8; a+8 <= nc.off; a += 8 {
		var L uint64
		ok := true
		for i, s := range ss {
			first := le64(s.pid, a)
			if first <= s.task || first-s.task >= taskWindow {
				ok = false
				break
			}
			if i == 0 {
				L = first - s.task
			} else if first-s.task != L {
				ok = false
				break
			}
		}
		if !ok {
			continue
		}
		for _, s := range ss {
			pprev, err := k.ReadU64(s.task + L + 8)
			if err != nil || pprev != s.pidAddr+uint64(a) {
				ok = false
				break
			}
		}
		if ok {
			links = append(links, candidate{off: a, vals: []uint64{L}})
		}
	}
	if len(links) == 0 {
		return fmt.Errorf("pid.tasks: no offset in struct pid leads to the same offset in every listed task")
	}
	c := links[0]
	x.v.pidNumbers = solved(nc.off, "in every allocator entry: its own index (numbers[0].nr) followed by a pointer to init_pid_ns (numbers[0].ns)")
	x.v.pidTasks = solved(c.off, fmt.Sprintf("pointer in the pid of each of %d listed tasks to one offset in the task, whose pprev points back (tasks[PIDTYPE_PID]); lowest of %d such", len(ss), len(links)))
	x.v.pidLinks = solved(int(c.vals[0]), "where pid.tasks[PIDTYPE_PID].first points in every listed task (pid_links[PIDTYPE_PID])")
	return nil
}
