package testguest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kvmscope/kvmscope/internal/testenv"
)

// TestBuildIntoFreshCache builds into an empty cache from several goroutines
// at once: all get the same checked file and no temporary directory is left.
func TestBuildIntoFreshCache(t *testing.T) {
	testenv.Require(t, testenv.Binutils)
	src, err := sourceDir()
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	const n = 4
	paths, errs := make([]string, n), make([]error, n)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			paths[i], errs[i] = buildInto(src, root)
		}()
	}
	wg.Wait()
	for i := 0; i < n; i++ {
		if errs[i] != nil {
			t.Fatalf("buildInto: %v", errs[i])
		}
		if paths[i] != paths[0] {
			t.Fatalf("paths differ: %q %q", paths[0], paths[i])
		}
	}
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || !strings.HasPrefix(entries[0].Name(), "tinyguest-") || strings.HasPrefix(entries[0].Name(), "tinyguest-build-") {
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		t.Fatalf("cache holds %q, want one tinyguest-HASH directory", names)
	}
	// A second call uses the cache (same path, nothing rebuilt).
	st1, _ := os.Stat(paths[0])
	p, err := buildInto(src, root)
	if err != nil || p != paths[0] {
		t.Fatalf("cached buildInto = %q, %v", p, err)
	}
	st2, _ := os.Stat(p)
	if !st1.ModTime().Equal(st2.ModTime()) {
		t.Errorf("cached guest was rebuilt")
	}
}

// TestCheckLayoutRejects: a guest whose layout drifted from the constants is
// refused, as is the ELF64 intermediate.
func TestCheckLayoutRejects(t *testing.T) {
	testenv.Require(t, testenv.Binutils)
	src, err := sourceDir()
	if err != nil {
		t.Fatal(err)
	}
	good, err := buildInto(src, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := checkLayout(good); err != nil {
		t.Fatalf("good guest rejected: %v", err)
	}
	if err := checkLayout(filepath.Join(filepath.Dir(good), "tinyguest64.elf")); err == nil || !strings.Contains(err.Error(), "ELFCLASS32") {
		t.Errorf("ELF64 accepted or wrong error: %v", err)
	}

	drifted := t.TempDir()
	for _, name := range sourceFiles {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if name == "guest.s" {
			old := []byte(".set pattern_pages,   8")
			if !bytes.Contains(b, old) {
				t.Fatalf("guest.s has no %q to change", old)
			}
			b = bytes.Replace(b, old, []byte(".set pattern_pages,   9"), 1)
		}
		if err := os.WriteFile(filepath.Join(drifted, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, err = buildInto(drifted, t.TempDir())
	if err == nil || !strings.Contains(err.Error(), "pattern_pages") {
		t.Fatalf("drifted layout: err = %v, want a pattern_pages mismatch", err)
	}
}

func TestPatternFor(t *testing.T) {
	p := PatternFor(3)
	if len(p) != PageSize {
		t.Fatalf("len %d", len(p))
	}
	line := "KVMSCOPE-PATTERN page 0003/0008\n"
	if len(line) != 32 || string(p[:32]) != line || string(p[PageSize-32:]) != line {
		t.Fatalf("page 3 = %q...%q", p[:32], p[PageSize-32:])
	}
	if string(PatternFor(0)[:32]) == line {
		t.Fatalf("pages 0 and 3 are equal")
	}
	if PatternFor(-1) != nil || PatternFor(PatternPages) != nil {
		t.Fatalf("out-of-range page gave a pattern")
	}
}

func TestExitStatus(t *testing.T) {
	for n, want := range map[int]int{0: 1, 5: 11, 127: 255, 128: 1} {
		if got := ExitStatus(n); got != want {
			t.Errorf("ExitStatus(%d) = %d, want %d", n, got, want)
		}
	}
}
