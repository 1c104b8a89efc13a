package session

import (
	"context"
	"errors"
	"testing"
)

// TestWriteActionExclusion: a write is refused while an action runs, an
// action while a write is between its pause and its resume, and each
// goes once the other has ended.
func TestWriteActionExclusion(t *testing.T) {
	s := New(Frozen{}, nil)
	ctx := context.Background()
	if err := s.beginAction(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.pauseForWrite(ctx); !errors.Is(err, ErrWriteDuringAction) {
		t.Errorf("a write during an action: %v, want ErrWriteDuringAction", err)
	}
	s.endAction()
	resume, err := s.pauseForWrite(ctx)
	if err != nil {
		t.Fatalf("a write after the action: %v", err)
	}
	if err := s.beginAction(); err == nil {
		t.Errorf("an action began during a write")
	}
	resume()
	if err := s.beginAction(); err != nil {
		t.Errorf("an action after the write: %v", err)
	}
	s.endAction()
}
