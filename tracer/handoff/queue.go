package handoff

import (
	"context"
	"sync"
)

// queue holds what the tracer reports (events, blocked writes) until the
// analysis process has taken it. Push never blocks, because the tracer
// calls it while QEMU waits; past max items it counts the rest as dropped.
//
// A batch handed out stays lent until a later take acknowledges it by
// number: the analysis process can die (or its reply be lost) after the
// keeper sent a batch and before it stored it, and the next one must get
// that batch, not nothing. Delivery is at least once.
type queue[T any] struct {
	mu      sync.Mutex
	items   []T
	max     int
	dropped uint64
	ready   chan struct{} // closed when items goes from empty to not

	lent        []T // the batch last handed out, not yet acknowledged
	lentDropped uint64
	lentNo      uint64 // its number; batches count from 1
}

func newQueue[T any](max int) *queue[T] { return &queue[T]{max: max, ready: make(chan struct{})} }

func (q *queue[T]) push(x T) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(q.items) >= q.max {
		q.dropped++
		return
	}
	q.items = append(q.items, x)
	if len(q.items) == 1 {
		close(q.ready)
	}
}

// take first forgets the lent batch if ack is its number (the taker has
// stored it), then returns the lent batch if there still is one, else
// waits until the queue holds something or ctx ends and lends all of it.
// dropped counts what push refused before the batch; no is the number to
// acknowledge it with (0 with no batch).
func (q *queue[T]) take(ctx context.Context, ack uint64) (items []T, dropped, no uint64) {
	for {
		q.mu.Lock()
		if q.lent != nil && ack == q.lentNo {
			q.lent, q.lentDropped = nil, 0
		}
		if q.lent == nil && len(q.items) > 0 {
			q.lentNo++
			q.lent, q.lentDropped = q.items, q.dropped
			q.items, q.dropped = nil, 0
			q.ready = make(chan struct{})
		}
		if q.lent != nil {
			items, dropped, no = q.lent, q.lentDropped, q.lentNo
			q.mu.Unlock()
			return items, dropped, no
		}
		ch := q.ready
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, 0, 0
		}
	}
}
