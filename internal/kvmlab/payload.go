package kvmlab

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/kvmscope/kvmscope/internal/testguest"
	"github.com/kvmscope/kvmscope/internal/testlinux"
)

// payload is what L1 boots: Debian's kernel and an initramfs holding
// everything the jobs need.
type payload struct {
	kernel, initrd string
	size           int64
}

// buildPayload stages L1's root file system under cfg.Work/root and packs it
// as an uncompressed newc cpio (decompressing under TCG costs more than
// reading the larger file). Paths inside L1 mirror the host's: the
// repository sits at its host path, so test binaries run in their package
// directories and find testdata as go test would.
func buildPayload(ctx context.Context, cfg Config, logf func(string, ...any)) (*payload, error) {
	g, err := testlinux.Guests()
	if err != nil {
		return nil, err
	}
	kernel := g.DebianKernel
	if cfg.Kernel != "" {
		kernel = cfg.Kernel
	}
	modules := filepath.Join(g.Dir, "debian", "kvm-modules")
	for _, f := range []string{kernel, filepath.Join(modules, "kvm-amd.ko")} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("%s missing: run `just guests` (scripts/fetch-guests.sh)", f)
		}
	}
	root := filepath.Join(cfg.Work, "root")
	if err := os.RemoveAll(root); err != nil {
		return nil, err
	}
	s := &stage{root: root}
	for _, d := range []string{"bin", "sbin", "usr/bin", "proc", "sys", "dev", "tmp", "etc", "root", "lab/bin", "lab/modules", "lab/cache"} {
		s.mkdir(d)
	}
	s.file("init", initScript, 0o755)
	s.file("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"), 0o644)
	s.file("etc/group", []byte("root:x:0:\nkvm:x:994:\nnogroup:x:65534:\n"), 0o644)

	// busybox-static (scripts/setup.sh installs it) with its applets.
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return nil, fmt.Errorf("busybox not installed (just setup)")
	}
	s.copy(bb, "bin/busybox")
	out, err := exec.Command(bb, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	for _, applet := range strings.Fields(string(out)) {
		s.symlink("busybox", "bin/"+applet)
	}
	for _, m := range []string{"irqbypass", "kvm", "kvm-amd"} {
		s.copy(filepath.Join(modules, m+".ko"), "lab/modules/"+m+".ko")
	}

	// The host's QEMU, its libraries and its firmware, at the host's
	// paths, so it runs in L1 exactly as it does here.
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return nil, fmt.Errorf("qemu-system-x86_64 not installed (just setup)")
	}
	s.copyAt(qemu)
	libs, err := sharedLibs(qemu)
	if err != nil {
		return nil, err
	}
	for _, l := range libs {
		s.copyAt(l)
	}
	// strace, when installed, for the benchmarks' every-syscall contrast.
	if strace, err := exec.LookPath("strace"); err == nil {
		s.copyAt(strace)
		if libs, err := sharedLibs(strace); err == nil {
			for _, l := range libs {
				s.copyAt(l)
			}
		}
	}
	for _, d := range []string{"/usr/share/qemu", "/usr/share/seabios"} {
		s.tree(d, d)
	}

	// The binaries, static: L1 has no Go and no C library of its own.
	bin := filepath.Join(root, "lab", "bin")
	builds := [][]string{
		{"build", "-o", filepath.Join(bin, "kvmscope"), "./cmd/kvmscope"},
		{"build", "-o", filepath.Join(bin, "kvmscope-qemu"), "./cmd/kvmscope-qemu"},
	}
	seen := map[string]bool{}
	for _, j := range cfg.Jobs {
		if !seen[j.Package] {
			seen[j.Package] = true
			builds = append(builds, []string{"test", "-c", "-o", filepath.Join(bin, testBinary(j.Package)), j.Package})
		}
	}
	for _, b := range builds {
		logf("go %s", strings.Join(b, " "))
		cmd := exec.CommandContext(ctx, "go", b...)
		cmd.Dir = cfg.Repo
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go %s: %v\n%s", strings.Join(b, " "), err, out)
		}
	}

	// The tiny guest, prebuilt: L1 has no binutils. Its cache directory
	// goes where KVMSCOPE_CACHE points inside L1.
	elf, err := testguest.Build()
	if err != nil {
		return nil, fmt.Errorf("build the tiny guest: %w", err)
	}
	s.tree(filepath.Dir(elf), filepath.Join("/lab/cache", filepath.Base(filepath.Dir(elf))))

	// The repository's files (tracked and new, never .git or .cache) at
	// their host path, and the guests at theirs.
	files, err := exec.Command("git", "-C", cfg.Repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output()
	if err != nil {
		return nil, fmt.Errorf("git ls-files: %w", err)
	}
	for _, f := range strings.Split(strings.TrimRight(string(files), "\x00"), "\x00") {
		if p := filepath.Join(cfg.Repo, f); f != "" && regular(p) {
			s.copyAt(p)
		}
	}
	for _, f := range []string{g.DebianKernel, g.DebianSystemMap, g.DebianConfig, g.GokrazyKernel, g.Initrd} {
		s.copyAt(f)
	}
	if g.Dir != filepath.Join(cfg.Repo, ".cache", "guests") {
		// Tell the tests where; the jobs file carries the environment.
		for i := range cfg.Jobs {
			cfg.Jobs[i].Env = append(cfg.Jobs[i].Env, "KVMSCOPE_GUESTS="+g.Dir)
		}
	}

	var jobs bytes.Buffer
	for i, j := range cfg.Jobs {
		dir, err := packageDir(cfg.Repo, j.Package)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(&jobs, "%s %s %s %s %s %s %s %s\n", jobName(i), dir, testBinary(j.Package),
			cmp.Or(j.Timeout, 10*time.Minute), orDash(j.Run), orDash(j.Bench), cmp.Or(j.BenchTime, "1s"), orDash(strings.Join(j.Env, ",")))
	}
	s.file("lab/jobs", jobs.Bytes(), 0o644)
	if s.err != nil {
		return nil, s.err
	}

	initrd := filepath.Join(cfg.Work, "payload.cpio")
	if err := packCPIO(ctx, root, initrd); err != nil {
		return nil, err
	}
	st, err := os.Stat(initrd)
	if err != nil {
		return nil, err
	}
	return &payload{kernel: kernel, initrd: initrd, size: st.Size()}, nil
}

// testBinary names a package's test binary in /lab/bin.
func testBinary(pkg string) string {
	return strings.ReplaceAll(strings.TrimPrefix(pkg, "github.com/kvmscope/kvmscope/"), "/", "_") + ".test"
}

// packageDir is the source directory of pkg.
func packageDir(repo, pkg string) (string, error) {
	out, err := exec.Command("go", "list", "-f", "{{.Dir}}", pkg).Output()
	if err != nil {
		return "", fmt.Errorf("go list %s: %w", pkg, err)
	}
	return strings.TrimSpace(string(out)), nil
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	if strings.ContainsAny(s, " \t\n") {
		panic("kvmlab: a job field holds white space: " + s)
	}
	return s
}

var lddLine = regexp.MustCompile(`(?:=>\s*)?(/\S+)\s+\(0x`)

// sharedLibs lists the libraries ldd says bin loads, the dynamic loader
// among them.
func sharedLibs(bin string) ([]string, error) {
	out, err := exec.Command("ldd", bin).Output()
	if err != nil {
		return nil, fmt.Errorf("ldd %s: %w", bin, err)
	}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if m := lddLine.FindStringSubmatch(sc.Text()); m != nil {
			libs = append(libs, m[1])
		}
	}
	if len(libs) == 0 {
		return nil, fmt.Errorf("ldd %s listed no libraries", bin)
	}
	return libs, nil
}

func regular(p string) bool {
	st, err := os.Lstat(p)
	return err == nil && st.Mode().IsRegular()
}

// packCPIO packs dir as a newc cpio archive, owned by root.
func packCPIO(ctx context.Context, dir, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	find := exec.CommandContext(ctx, "find", ".", "-print0")
	find.Dir = dir
	list, err := find.Output()
	if err != nil {
		return fmt.Errorf("find: %w", err)
	}
	cpio := exec.CommandContext(ctx, "cpio", "--null", "-o", "-H", "newc", "--quiet", "-R", "0:0")
	cpio.Dir = dir
	cpio.Stdin = bytes.NewReader(list)
	cpio.Stdout = f
	var errb bytes.Buffer
	cpio.Stderr = &errb
	if err := cpio.Run(); err != nil {
		return fmt.Errorf("cpio: %v: %s", err, errb.String())
	}
	return f.Close()
}

// stage writes L1's root tree; the first error sticks.
type stage struct {
	root string
	err  error
}

func (s *stage) path(rel string) string { return filepath.Join(s.root, rel) }

func (s *stage) mkdir(rel string) {
	if s.err == nil {
		s.err = os.MkdirAll(s.path(rel), 0o755)
	}
}

func (s *stage) file(rel string, b []byte, mode os.FileMode) {
	if s.err == nil {
		s.err = os.WriteFile(s.path(rel), b, mode)
	}
}

func (s *stage) symlink(target, rel string) {
	if s.err != nil {
		return
	}
	if _, err := os.Lstat(s.path(rel)); err == nil {
		return
	}
	s.err = os.Symlink(target, s.path(rel))
}

// copyAt copies the host file abs to the same path in L1, following
// symbolic links.
func (s *stage) copyAt(abs string) { s.copy(abs, abs) }

func (s *stage) copy(src, rel string) {
	if s.err != nil {
		return
	}
	dst := s.path(rel)
	if _, err := os.Lstat(dst); err == nil {
		return
	}
	s.err = copyFile(src, dst)
}

// tree copies the directory src to rel in L1, keeping symbolic links.
func (s *stage) tree(src, rel string) {
	if s.err != nil {
		return
	}
	s.err = filepath.Walk(src, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		dst := s.path(filepath.Join(rel, strings.TrimPrefix(p, src)))
		switch {
		case info.IsDir():
			return os.MkdirAll(dst, 0o755)
		case info.Mode()&os.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(t, dst)
		default:
			return copyFile(p, dst)
		}
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, st.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
