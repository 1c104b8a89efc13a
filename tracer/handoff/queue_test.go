package handoff

import (
	"context"
	"slices"
	"testing"
	"time"
)

// TestQueueRedelivers: a batch stays lent until a take acknowledges it by
// number, so a taker that died with it (or lost the reply) leaves it to
// the next; what push dropped is counted once, with its batch.
func TestQueueRedelivers(t *testing.T) {
	q := newQueue[string](2)
	q.push("a")
	q.push("b")
	q.push("c") // past max
	ctx := context.Background()
	items, dropped, no := q.take(ctx, 0)
	if !slices.Equal(items, []string{"a", "b"}) || dropped != 1 || no != 1 {
		t.Fatalf("first take: %v dropped %d no %d", items, dropped, no)
	}
	// A new taker knows no batch: it gets the unacknowledged one again,
	// and what was pushed since waits behind it.
	q.push("d")
	items, dropped, no = q.take(ctx, 0)
	if !slices.Equal(items, []string{"a", "b"}) || dropped != 1 || no != 1 {
		t.Fatalf("take without ack: %v dropped %d no %d, want the lent batch again", items, dropped, no)
	}
	// A stale or wrong number acknowledges nothing.
	if items, _, no = q.take(ctx, 7); no != 1 || len(items) != 2 {
		t.Fatalf("take with a wrong ack: %v no %d", items, no)
	}
	items, dropped, no = q.take(ctx, 1)
	if !slices.Equal(items, []string{"d"}) || dropped != 0 || no != 2 {
		t.Fatalf("take after ack: %v dropped %d no %d", items, dropped, no)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if items, _, no = q.take(short, 2); items != nil || no != 0 {
		t.Fatalf("take of an empty, acknowledged queue: %v no %d", items, no)
	}
	// The queue takes new items after all that.
	q.push("e")
	if items, _, no = q.take(ctx, 0); !slices.Equal(items, []string{"e"}) || no != 3 {
		t.Fatalf("take after the wait: %v no %d", items, no)
	}
}
