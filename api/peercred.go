package api

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// peerInGroups reports whether the peer's primary gid (from SO_PEERCRED) or
// one of its supplementary groups is in groups. SO_PEERCRED carries no
// supplementary groups; they come from /proc/PID/status of the peer, read
// while its connection is open (a peer that already exited fails closed).
func peerInGroups(cred *unix.Ucred, groups []int) bool {
	if len(groups) == 0 {
		return false
	}
	if slices.Contains(groups, int(cred.Gid)) {
		return true
	}
	sup, err := procGroups(int(cred.Pid))
	if err != nil {
		return false
	}
	for _, g := range sup {
		if slices.Contains(groups, g) {
			return true
		}
	}
	return false
}

// procGroups reads the "Groups:" line of /proc/PID/status.
func procGroups(pid int) ([]int, error) {
	if pid <= 0 {
		return nil, fmt.Errorf("no peer pid")
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		var out []int
		for _, f := range strings.Fields(rest) {
			g, err := strconv.Atoi(f)
			if err != nil {
				return nil, fmt.Errorf("/proc/%d/status: bad group %q", pid, f)
			}
			out = append(out, g)
		}
		return out, nil
	}
	return nil, fmt.Errorf("/proc/%d/status has no Groups line", pid)
}

// giveGroup makes the socket at path belong to the first of groups, unless
// it already belongs to one of them (in a setgid directory it inherits the
// directory's group, which is how an unprivileged QEMU user gets there).
func giveGroup(path string, groups []int) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return err
	}
	if slices.Contains(groups, int(st.Gid)) {
		return nil
	}
	if err := os.Lchown(path, -1, groups[0]); err != nil {
		return fmt.Errorf("members of group %d cannot reach %s: %w (make its directory setgid to that group, see docs/libvirt.md)", groups[0], path, err)
	}
	return nil
}
