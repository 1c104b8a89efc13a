package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kvmscope/kvmscope/internal/testlinux"
	"github.com/kvmscope/kvmscope/introspect"
)

// TestCat: `kvmscope cat` (Debian 6.1 under TCG, read-only `run`) reads
// guest files from the guest kernel's page cache: /etc/passwd as the
// initramfs has it, /init over two pages as scripts/initramfs/init, the
// first bytes only with --bytes; a path the dentry cache lacks and a
// directory are refused with one line.
func TestCat(t *testing.T) {
	p := testlinux.Require(t)
	sock := filepath.Join(t.TempDir(), "api.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	g, err := testlinux.Boot(ctx, testlinux.Options{
		Kernel:  p.DebianKernel,
		Accel:   "tcg",
		Wrapper: []string{kvmscopeBin, "--log-level", "warn", "run", "--api", sock, "--"},
	})
	if err != nil {
		t.Fatalf("boot under kvmscope run: %v", err)
	}
	defer g.Close()
	passwd := "root:x:0:0:root:/root:/bin/sh\nkvmuser:x:1000:1000:kvmscope test:/tmp:/bin/sh\n"
	if out, errOut, code := kvmscope(t, "cat", "--api", sock, "--path", "/etc/passwd"); code != 0 || out != passwd {
		t.Errorf("cat /etc/passwd: code %d, %q%s; want %q", code, out, errOut, passwd)
	}
	init, err := os.ReadFile("../../scripts/initramfs/init")
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, code := kvmscope(t, "cat", "--api", sock, "--path", "/init", "--bytes", "1048576", "--json")
	var f introspect.CachedFile
	if code != 0 || json.Unmarshal([]byte(out), &f) != nil {
		t.Fatalf("cat /init --json: code %d: %s%s", code, out, errOut)
	}
	if string(f.Data) != string(init) || f.Size != int64(len(init)) || f.Uncached != nil || f.Inode == 0 {
		t.Errorf("cat /init: %d bytes of %d, inode %d, uncached %v; want the %d bytes of scripts/initramfs/init", len(f.Data), f.Size, f.Inode, f.Uncached, len(init))
	}
	t.Logf("/init: inode %d, %d bytes in %d pages", f.Inode, f.Size, (f.Size+4095)/4096)
	if out, _, code := kvmscope(t, "cat", "--api", sock, "--path", "/etc/../etc/passwd", "--bytes", "9"); code != 0 || out != passwd[:9] {
		t.Errorf("cat --bytes 9: code %d, %q", code, out)
	}
	// A dump reads the same.
	core := filepath.Join(t.TempDir(), "guest.core")
	if out, errOut, code := kvmscope(t, "dump", "--api", sock, "-o", core); code != 0 {
		t.Fatalf("dump: code %d: %s%s", code, out, errOut)
	}
	if out, errOut, code := kvmscope(t, "cat", "--core", core, "--path", "/etc/passwd"); code != 0 || out != passwd {
		t.Errorf("cat --core /etc/passwd: code %d, %q%s", code, out, errOut)
	}
	for _, c := range []struct{ path, want string }{
		{"/etc/nonexistent", "not in the guest kernel's caches"},
		{"/etc", "not a regular file"},
		{"etc/passwd", "absolute path"},
	} {
		out, errOut, code := kvmscope(t, "cat", "--api", sock, "--path", c.path)
		if code == 0 || !strings.Contains(errOut, c.want) || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
			t.Errorf("cat %s: code %d, stdout %q, stderr %q; want one line with %q", c.path, code, out, errOut, c.want)
		}
	}
}
