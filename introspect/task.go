package introspect

import (
	"errors"
	"fmt"
)

// ErrOffsetsMissing is wrapped when an operation needs an offset that was
// not found.
var ErrOffsetsMissing = errors.New("needed offset unknown")

// ForEachTask calls f with the address of every thread-group leader on
// init_task's tasks list, init_task first (for_each_process in
// include/linux/sched/signal.h). The walk checks each link both ways, and
// stops with an error on a list that does not come back to init_task
// within maxTasks entries, revisits a task or breaks a link: a forged or
// changing list ends in bounded time.
func (k *Kernel) ForEachTask(off *Offsets, f func(task uint64) error) error {
	initTask, ok := k.Symbol("init_task")
	if !ok {
		return fmt.Errorf("tasks: kallsyms has no init_task: %w", ErrNotFound)
	}
	return forEachTask(k, off, initTask, f)
}

func forEachTask(k *Kernel, off *Offsets, initTask uint64, f func(task uint64) error) error {
	if !off.TaskTasks.Known() {
		return fmt.Errorf("tasks: task_struct.tasks: %w", ErrOffsetsMissing)
	}
	lo := uint64(off.TaskTasks.Value)
	if err := f(initTask); err != nil {
		return err
	}
	nodes, err := listNodes(k, initTask+lo, maxTasks, nil)
	if err != nil {
		return fmt.Errorf("tasks: %w", err)
	}
	for _, n := range nodes {
		if err := f(n - lo); err != nil {
			return err
		}
	}
	return nil
}

// ForEachThread calls f with every thread of the group whose leader is
// the task at leader, the leader first (for_each_thread: the list headed
// by signal->thread_head through task_struct.thread_node, Linux 3.14+).
func (k *Kernel) ForEachThread(off *Offsets, leader uint64, f func(task uint64) error) error {
	return forEachThread(k, off, leader, nil, f)
}

// forEachThread is ForEachThread taking each list node from *budget when
// budget is not nil: a walk over all groups must be bounded in total, not
// per group, as forged groups could all share one huge list.
func forEachThread(k *Kernel, off *Offsets, leader uint64, budget *int, f func(task uint64) error) error {
	if !off.TaskSignal.Known() || !off.TaskThreadNode.Known() || !off.SignalThreadHd.Known() {
		return fmt.Errorf("threads: signal/thread_node: %w", ErrOffsetsMissing)
	}
	sig, err := k.ReadPtr(leader + uint64(off.TaskSignal.Value))
	if err != nil {
		return fmt.Errorf("threads of %#x: signal: %w", leader, err)
	}
	nodes, err := listNodes(k, sig+uint64(off.SignalThreadHd.Value), maxTasks, budget)
	if err != nil {
		return fmt.Errorf("threads of %#x: %w", leader, err)
	}
	tn := uint64(off.TaskThreadNode.Value)
	if err := f(leader); err != nil {
		return err
	}
	for _, n := range nodes {
		if n-tn == leader {
			continue
		}
		if err := f(n - tn); err != nil {
			return err
		}
	}
	return nil
}
