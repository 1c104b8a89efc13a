package introspect

import (
	"strconv"
	"strings"
	"testing"
)

// procModule is one line of the guest's /proc/modules.
type procModule struct {
	name string
	size uint64
	base uint64
}

// parseProcModules reads the /proc/modules block the test init printed.
func parseProcModules(t *testing.T, serial string) []procModule {
	t.Helper()
	var out []procModule
	in := false
	for _, line := range strings.Split(serial, "\n") {
		line = strings.TrimRight(line, "\r")
		if i := strings.Index(line, "KVMSCOPE-"); i > 0 {
			line = line[i:]
		}
		switch line {
		case "KVMSCOPE-MODULES-BEGIN":
			in = true
			continue
		case "KVMSCOPE-MODULES-END":
			return out
		}
		if !in {
			continue
		}
		// name size refcount deps state address
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("bad /proc/modules line %q", line)
		}
		size, err1 := strconv.ParseUint(f[1], 10, 64)
		base, err2 := strconv.ParseUint(strings.TrimPrefix(f[5], "0x"), 16, 64)
		if err1 != nil || err2 != nil {
			t.Fatalf("bad /proc/modules line %q", line)
		}
		out = append(out, procModule{f[0], size, base})
	}
	t.Fatalf("no KVMSCOPE-MODULES block on the serial console")
	return nil
}

// compareModules checks the module list read from outside against the
// guest's /proc/modules: same modules, same order, sizes and bases.
func compareModules(t *testing.T, ours []Module, guest []procModule) {
	t.Helper()
	if len(ours) != len(guest) {
		t.Fatalf("%d modules, guest lists %d: %+v vs %+v", len(ours), len(guest), ours, guest)
	}
	for i, g := range guest {
		o := ours[i]
		if o.Name != g.name || o.Size != g.size || o.Base != g.base || o.State != "live" {
			t.Errorf("module %d: got %s size %d base %#x state %q; guest: %s size %d base %#x",
				i, o.Name, o.Size, o.Base, o.State, g.name, g.size, g.base)
		}
	}
	if len(guest) == 0 {
		t.Log("no module loaded in the guest: checked that the modules list is empty and well-formed")
	} else {
		t.Logf("%d modules match /proc/modules", len(guest))
	}
}

func TestModuleName(t *testing.T) {
	pad := func(s string) []byte { b := make([]byte, moduleNameLen); copy(b, s); return b }
	if n, ok := moduleName(pad("crc_itu_t")); !ok || n != "crc_itu_t" {
		t.Errorf("moduleName(crc_itu_t) = %q, %v", n, ok)
	}
	bad := pad("dummy")
	bad[40] = 'x' // garbage after the NUL
	for _, b := range [][]byte{pad(""), pad("a b"), bad, []byte("short")} {
		if n, ok := moduleName(b); ok {
			t.Errorf("moduleName(%q) = %q, want invalid", b, n)
		}
	}
}
