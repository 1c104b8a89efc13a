package handoff

import (
	"context"
	"sync"
)

// queue holds what the tracer reports (events, blocked writes) until the
// analysis process takes it. Push never blocks, because the tracer calls it
// while QEMU waits; past max items it counts the rest as dropped.
type queue[T any] struct {
	mu      sync.Mutex
	items   []T
	max     int
	dropped uint64
	ready   chan struct{} // closed when items goes from empty to not
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

// take waits until the queue holds something or ctx ends, and empties it.
// dropped counts what push refused since the last take.
func (q *queue[T]) take(ctx context.Context) (items []T, dropped uint64) {
	for {
		q.mu.Lock()
		if len(q.items) > 0 {
			items, dropped = q.items, q.dropped
			q.items, q.dropped = nil, 0
			q.ready = make(chan struct{})
			q.mu.Unlock()
			return items, dropped
		}
		ch := q.ready
		q.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, 0
		}
	}
}
