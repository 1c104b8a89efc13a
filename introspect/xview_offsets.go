package introspect

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf/btf"
)

// viewOffsets are the offsets the cross-views need beyond Offsets: from
// BTF when the kernel has it, else solved from the kernel's own objects
// (see the solve functions below). A view whose offsets are unknown does
// not run; its reason says why.
type viewOffsets struct {
	// pid_idr view.
	xaHead     Offset // pid_namespace.idr.idr_rt.xa_head (rnode before 4.20)
	nodeSlots  Offset // xa_node.slots (radix_tree_node.slots before 4.20)
	chunk      int    // XA_CHUNK_SIZE: slots per node (64, 16 with CONFIG_BASE_SMALL)
	pidTasks   Offset // pid.tasks (tasks[PIDTYPE_PID] is the first)
	pidNumbers Offset // pid.numbers (numbers[0].nr is the first int)
	pidLinks   Offset // task_struct.pid_links (pids[PIDTYPE_PID].node before 4.19)
	// runqueue view.
	rqCurr, rqIdle Offset
	// rq.cfs_tasks and task_struct.se.group_node, BTF only.
	rqCFSTasks, seGroupNode Offset
	// module_kset view: kobject.entry and name, module_kobject.mod;
	// module.mkobj (the module's own module_kobject) for the carve.
	kobjEntry, kobjName, mkobjMod, moduleMkobj Offset
	// exitState is task_struct.exit_state, BTF only (the flags and
	// state tell an exiting task without it).
	exitState Offset
}

// btfArrayLen returns the number of elements of the array member of
// struct structName.
func (k *Kernel) btfArrayLen(structName, member string) (int, error) {
	t, err := k.structType(structName)
	if err != nil {
		return 0, err
	}
	m, _, err := findMember(btf.UnderlyingType(t), member, 0)
	if err != nil {
		return 0, fmt.Errorf("BTF: %s.%s: %w", structName, member, err)
	}
	a, ok := btf.UnderlyingType(m.Type).(*btf.Array)
	if !ok {
		return 0, fmt.Errorf("BTF: %s.%s is not an array", structName, member)
	}
	return int(a.Nelems), nil
}

// btfOffset is the first of the member paths BTF has, as an Offset.
func (k *Kernel) btfOffset(strct string, paths ...string) (Offset, error) {
	var last error = ErrNoBTF
	for _, p := range paths {
		o, err := k.MemberOffset(strct, p)
		if err == nil {
			return Offset{Value: int64(o), Source: SourceBTF, How: strct + "." + p}, nil
		}
		last = err
	}
	return Offset{}, last
}

// Layouts that have not changed in the versions the views support, used
// when there is no BTF and checked by structure where they are used.
const (
	// xaHeadDefault: struct pid_namespace starts with its struct idr
	// (4.15+), which starts with the radix tree / xarray root, whose
	// head pointer follows a 4-byte lock and 4-byte gfp flags.
	xaHeadDefault = 8
	// nodeSlotsDefault: struct xa_node (radix_tree_node) is shift,
	// offset, count, nr_values (4 bytes, padded to 8), parent, array
	// (root), a 16-byte union (private_list / rcu_head), then slots.
	nodeSlotsDefault = 40
	nodeParent       = 8
	nodeArray        = 16
	chunkDefault     = 64
)

// pidViewFromBTF fills the pid_idr offsets from BTF.
func (k *Kernel) pidViewFromBTF(v *viewOffsets) error {
	var errs []error
	var err error
	if v.xaHead, err = k.btfOffset("pid_namespace", "idr.idr_rt.xa_head", "idr.idr_rt.rnode"); err != nil {
		errs = append(errs, err)
	}
	if v.nodeSlots, err = k.btfOffset("xa_node", "slots"); err != nil {
		if v.nodeSlots, err = k.btfOffset("radix_tree_node", "slots"); err != nil {
			errs = append(errs, err)
		}
	}
	v.chunk = chunkDefault
	if n, err := k.btfArrayLen("xa_node", "slots"); err == nil && n > 0 {
		v.chunk = n
	}
	if v.pidTasks, err = k.btfOffset("pid", "tasks"); err != nil {
		errs = append(errs, err)
	}
	if v.pidNumbers, err = k.btfOffset("pid", "numbers"); err != nil {
		errs = append(errs, err)
	}
	if v.pidLinks, err = k.btfOffset("task_struct", "pid_links", "pids"); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// members lists the known offsets by kernel name.
func (v *viewOffsets) members() map[string]Offset {
	m := map[string]Offset{}
	for name, o := range map[string]Offset{
		"pid_namespace.idr.idr_rt.xa_head": v.xaHead, "xa_node.slots": v.nodeSlots,
		"pid.tasks": v.pidTasks, "pid.numbers": v.pidNumbers, "task_struct.pid_links": v.pidLinks,
		"rq.curr": v.rqCurr, "rq.idle": v.rqIdle, "rq.cfs_tasks": v.rqCFSTasks, "task_struct.se.group_node": v.seGroupNode, "task_struct.exit_state": v.exitState,
		"kobject.entry": v.kobjEntry, "kobject.name": v.kobjName, "module_kobject.mod": v.mkobjMod,
		"module.mkobj.mod": v.moduleMkobj,
	} {
		if o.Known() {
			m[name] = o
		}
	}
	return m
}
