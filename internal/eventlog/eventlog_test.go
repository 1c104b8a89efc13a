package eventlog

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
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
