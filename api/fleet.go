package api

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// A FleetSocket is one VM's API socket found in a socket directory: the
// VM's name is the socket's file name without ".sock" (what --vm NAME
// takes).
type FleetSocket struct {
	Name string `json:"name"`
	Path string `json:"socket"`
}

// ScanSockets lists the API sockets (NAME.sock, a unix socket) in dirs,
// sorted by name. A name found in an earlier directory hides the same name
// in a later one, as --vm NAME finds the first. A directory that does not
// exist holds no VM; one that cannot be read is an error in errs (the
// others are still scanned).
func ScanSockets(dirs ...string) (socks []FleetSocket, errs []error) {
	seen := map[string]bool{}
	for _, dir := range dirs {
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("socket directory: %w", err))
			continue
		}
		for _, e := range ents {
			name, ok := strings.CutSuffix(e.Name(), ".sock")
			if !ok || name == "" || e.Type()&os.ModeSocket == 0 || seen[name] {
				continue
			}
			seen[name] = true
			socks = append(socks, FleetSocket{Name: name, Path: filepath.Join(dir, e.Name())})
		}
	}
	sort.Slice(socks, func(i, j int) bool { return socks[i].Name < socks[j].Name })
	return socks, errs
}

// ErrStale is the error of a socket nothing listens on: the kvmscope that
// served it is gone (killed before it could remove its socket).
var ErrStale = errors.New("stale socket: nothing listens on it")

// ProbeSocket connects to the socket at path and hangs up: nil when
// something listens, ErrStale when nothing does, else why it could not
// connect.
func ProbeSocket(path string, timeout time.Duration) error {
	c, err := net.DialTimeout("unix", path, timeout)
	if err == nil {
		c.Close()
		return nil
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return ErrStale
	}
	return (&Client{Socket: path}).dialError(err)
}
