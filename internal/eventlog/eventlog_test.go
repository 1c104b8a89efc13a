package eventlog

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestAppendContinuesSequence(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.events.jsonl")
	l, err := Open(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if _, err := l.Append("ioctl", map[string]any{"n": i}); err != nil {
			t.Fatal(err)
		}
	}
	l.Close()
	l, err = Open(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	seq, err := l.Append("ioctl", struct{}{})
	if err != nil || seq != 4 {
		t.Fatalf("seq after reopen = %d, %v; want 4", seq, err)
	}
	if _, err := l.Append("bad", 5); err == nil {
		t.Fatal("a non-object event was accepted")
	}
	l.Close()
	f, _ := os.Open(path)
	defer f.Close()
	sc := bufio.NewScanner(f)
	var n uint64
	for sc.Scan() {
		var e map[string]any
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		n++
		if e["seq"].(float64) != float64(n) || e["kind"] == "" || e["time"] == "" {
			t.Fatalf("line %d = %v", n, e)
		}
	}
	if n != 4 {
		t.Fatalf("%d lines, want 4", n)
	}
}

func TestRotateSinceWait(t *testing.T) {
	path := filepath.Join(t.TempDir(), "vm.events.jsonl")
	l, err := Open(path, 0o640)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.SetMaxSize(300)
	for i := 0; i < 20; i++ {
		if _, err := l.Append("ioctl", map[string]any{"n": i}); err != nil {
			t.Fatal(err)
		}
	}
	if st, err := os.Stat(path); err != nil || st.Size() > 300 {
		t.Fatalf("current file: %v, %v; want at most 300 bytes", st, err)
	}
	if st, err := os.Stat(path + ".1"); err != nil || st.Mode().Perm() != 0o640 {
		t.Fatalf("rotated file: %v, %v", st, err)
	}
	evs, oldest, err := l.Since(0, 100)
	if err != nil || oldest <= 1 || len(evs) != int(20-oldest+1) {
		t.Fatalf("Since(0): %d events, oldest %d, %v", len(evs), oldest, err)
	}
	evs, _, _ = l.Since(18, 100)
	if len(evs) != 2 || !strings.Contains(string(evs[0]), `"seq":19,`) {
		t.Fatalf("Since(18) = %s", evs)
	}
	if evs, _, _ = l.Since(0, 3); len(evs) != 3 {
		t.Errorf("Since with max 3: %d events", len(evs))
	}
	if c := l.Counts(); c["ioctl"] != 20 {
		t.Errorf("counts %v", c)
	}
	// Wait returns at once for an older seq, and wakes on an append.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.Wait(ctx, 19); err != nil {
		t.Fatal(err)
	}
	done := make(chan error)
	go func() { done <- l.Wait(ctx, 20) }()
	time.Sleep(20 * time.Millisecond)
	l.Append("abi", struct{}{})
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel2()
	if err := l.Wait(short, 21); err == nil {
		t.Error("Wait returned with no new event")
	}
}
