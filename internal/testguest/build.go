package testguest

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
)

// sourceFiles are the files the guest is built from; their contents key the
// cache.
var sourceFiles = []string{"build.sh", "guest.ld", "guest.s"}

var (
	buildOnce sync.Once
	buildPath string
	buildErr  error
)

// Build compiles the tiny guest (testdata/tinyguest/build.sh, which needs
// only binutils: as, ld, objcopy) into a cache directory and returns the path
// of the multiboot ELF to pass to QEMU's -kernel. The cache is
// $KVMSCOPE_CACHE, else os.UserCacheDir()/kvmscope (else
// $TMPDIR/kvmscope-cache-UID), in a subdirectory named
// after a hash of the sources, so a build happens once per source change.
// Within a process the work is done once; concurrent callers, in this process
// or others, get the same path. The built ELF is checked against this
// package's layout constants before it is returned.
func Build() (string, error) {
	buildOnce.Do(func() {
		var src, root string
		src, buildErr = sourceDir()
		if buildErr != nil {
			return
		}
		root, buildErr = cacheRoot()
		if buildErr != nil {
			return
		}
		buildPath, buildErr = buildInto(src, root)
	})
	return buildPath, buildErr
}

// sourceDir finds testdata/tinyguest: $KVMSCOPE_TINYGUEST_SRC, else beside
// this package's source file, else in the current directory or one of its
// parents (for binaries built with -trimpath).
func sourceDir() (string, error) {
	if d := os.Getenv("KVMSCOPE_TINYGUEST_SRC"); d != "" {
		return d, nil
	}
	var tried []string
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		d := filepath.Join(filepath.Dir(file), "..", "..", "testdata", "tinyguest")
		if isSourceDir(d) {
			return filepath.Clean(d), nil
		}
		tried = append(tried, d)
	}
	if wd, err := os.Getwd(); err == nil {
		for d := wd; ; d = filepath.Dir(d) {
			c := filepath.Join(d, "testdata", "tinyguest")
			if isSourceDir(c) {
				return c, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
		tried = append(tried, wd+" and its parents")
	}
	return "", fmt.Errorf("tiny guest sources (testdata/tinyguest/guest.s) not found in %q; set KVMSCOPE_TINYGUEST_SRC", tried)
}

func isSourceDir(d string) bool {
	st, err := os.Stat(filepath.Join(d, "guest.s"))
	return err == nil && st.Mode().IsRegular()
}

// cacheRoot is $KVMSCOPE_CACHE, else the user cache directory's kvmscope/,
// else a per-user directory under the temporary directory.
func cacheRoot() (string, error) {
	if d := os.Getenv("KVMSCOPE_CACHE"); d != "" {
		return d, nil
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "kvmscope"), nil
	}
	// No $XDG_CACHE_HOME nor $HOME (some CI and service environments).
	return filepath.Join(os.TempDir(), fmt.Sprintf("kvmscope-cache-%d", os.Getuid())), nil
}

// sourceHash hashes the names and contents of the source files.
func sourceHash(src string) (string, error) {
	h := sha256.New()
	for _, name := range sourceFiles {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			return "", fmt.Errorf("read tiny guest source: %w", err)
		}
		fmt.Fprintf(h, "%s\x00%d\x00", name, len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// buildInto builds the guest from src under root/tinyguest-HASH unless a
// checked build is already there. Each build happens in its own temporary
// directory that is renamed into place, so concurrent builders (several test
// binaries of one `go test ./...`) never see a half-written file: the first
// rename wins and the others use its result.
func buildInto(src, root string) (string, error) {
	sum, err := sourceHash(src)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, "tinyguest-"+sum)
	path := filepath.Join(dir, "tinyguest.elf")
	if _, err := os.Stat(path); err == nil {
		if err := checkLayout(path); err != nil {
			return "", fmt.Errorf("cached tiny guest %s (remove %s to rebuild): %w", path, dir, err)
		}
		return path, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", fmt.Errorf("tiny guest cache: %w", err)
	}
	tmp, err := os.MkdirTemp(root, "tinyguest-build-")
	if err != nil {
		return "", fmt.Errorf("tiny guest cache: %w", err)
	}
	defer os.RemoveAll(tmp) // a no-op once renamed

	cmd := exec.Command("sh", filepath.Join(src, "build.sh"), tmp)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("build tiny guest (%s): %w\n%s", cmd, err, bytes.TrimSpace(out.Bytes()))
	}
	if err := checkLayout(filepath.Join(tmp, "tinyguest.elf")); err != nil {
		return "", fmt.Errorf("built tiny guest does not match internal/testguest/layout.go: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Lost the race to another builder of the same sources: use its
		// result (rename of a directory onto a non-empty one fails).
		if _, serr := os.Stat(path); serr != nil {
			return "", fmt.Errorf("install tiny guest: %w", err)
		}
	}
	return path, nil
}

// Symbol returns the address of symbol name in the guest ELF at path (for
// code addresses such as guard_store, which move when the code changes).
func Symbol(path, name string) (uint64, error) {
	f, err := elf.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		return 0, fmt.Errorf("%s: symbols: %w", path, err)
	}
	for _, s := range syms {
		if s.Name == name {
			return s.Value, nil
		}
	}
	return 0, fmt.Errorf("%s: no symbol %s", path, name)
}

// checkLayout verifies that the ELF at path is the 32-bit multiboot image
// this package describes: its symbols sit where the constants say.
func checkLayout(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS32 || f.Machine != elf.EM_386 {
		return fmt.Errorf("%s: %v %v, want ELFCLASS32 EM_386 (QEMU's multiboot loader takes only ELF32)", path, f.Class, f.Machine)
	}
	if f.Entry < CodeStart || f.Entry >= CodeEnd {
		return fmt.Errorf("%s: entry %#x outside code [%#x, %#x)", path, f.Entry, CodeStart, CodeEnd)
	}
	syms, err := f.Symbols()
	if err != nil {
		return fmt.Errorf("%s: symbols: %w", path, err)
	}
	got := make(map[string]uint64, len(syms))
	for _, s := range syms {
		got[s.Name] = s.Value
	}
	// Symbols above 4 GiB lose their top half in ELF32: compare those
	// truncated.
	want := []struct {
		name  string
		value uint64
	}{
		{"code_start", CodeStart},
		{"pml4", PML4GPA},
		{"status", StatusGPA},
		{"ready", ReadyGPA},
		{"boot_magic", BootMagicGPA},
		{"mode", ModeGPA},
		{"arg", ArgGPA},
		{"io_done", IODoneGPA},
		{"cmdline", CmdlineGPA},
		{"counter", CounterGPA},
		{"go", GoGPA},
		{"guard_seen", GuardSeenGPA},
		{"guard_done", GuardDoneGPA},
		{"touch", TouchGPA},
		{"regs_seen", RegsSeenGPA},
		{"regs_done", RegsDoneGPA},
		{"msr_seen", MSRSeenGPA},
		{"regs_magic", RegsMagic & 0xffffffff},
		{"guard_value", GuardValue & 0xffffffff},
		{"stack_top", ImageEnd},
		{"pattern_gpa", PatternGPA},
		{"pattern_pages", PatternPages},
		{"pattern_va", PatternVA & 0xffffffff},
		{"ready_value", ReadyValue & 0xffffffff},
		{"io_port", IOPort},
		{"debug_exit_port", DebugExitPort},
	}
	var errs []error
	for _, w := range want {
		v, ok := got[w.name]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("symbol %s missing", w.name))
		case v != w.value:
			errs = append(errs, fmt.Errorf("symbol %s = %#x, want %#x", w.name, v, w.value))
		}
	}
	for _, name := range []string{"code_end", "spin"} {
		if v, ok := got[name]; !ok || v < CodeStart || v > CodeEnd {
			errs = append(errs, fmt.Errorf("symbol %s = %#x (present %v), want within [%#x, %#x]", name, v, ok, CodeStart, CodeEnd))
		}
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && (p.Paddr < CodeStart || p.Paddr+p.Memsz > ImageEnd) {
			errs = append(errs, fmt.Errorf("PT_LOAD [%#x, %#x) outside [%#x, %#x)", p.Paddr, p.Paddr+p.Memsz, CodeStart, ImageEnd))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
