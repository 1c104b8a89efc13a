package testenv

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// An Entry is one line of the run record: where one test ran and why.
type Entry struct {
	// Dir is the test binary's working directory: its package's source
	// directory, as go test runs it.
	Dir   string `json:"dir"`
	Test  string `json:"test"`
	Needs []Need `json:"needs"`
	// Where is Native, Lab, Deferred, Skipped or NotRun.
	Where  string `json:"where"`
	Reason string `json:"reason,omitempty"`
}

// write appends e to $KVMSCOPE_RECORD when it is set. Each entry is one
// short write to a file opened O_APPEND, so the test binaries of one
// `go test ./...` that run at once never interleave within a line.
func write(e Entry) {
	path := os.Getenv(EnvRecord)
	if path == "" {
		return
	}
	b, err := json.Marshal(e)
	if err != nil {
		panic(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		// The record is how CI knows a test ran: losing it must not pass.
		panic(fmt.Sprintf("testenv: open the run record: %v", err))
	}
	defer f.Close()
	if _, err := f.Write(append(b, '\n')); err != nil {
		panic(fmt.Sprintf("testenv: write the run record: %v", err))
	}
}

// Package is the import path of the package whose test wrote e: its
// directory relative to repo, the module's root, under module's path.
func (e Entry) Package(repo, module string) (string, error) {
	rel, err := filepath.Rel(repo, e.Dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", fmt.Errorf("run record: test %s ran in %s, outside %s", e.Test, e.Dir, repo)
	}
	if rel == "." {
		return module, nil
	}
	return module + "/" + filepath.ToSlash(rel), nil
}

// ReadRecord reads a run record file. A missing file is an empty record.
func ReadRecord(path string) ([]Entry, error) { return ReadJSONLines[Entry](path) }

// ReadJSONLines reads a file of JSON values, one a line, as the run record
// and go test -json write them. Lines that are not JSON objects (a tool's
// own messages in between) are passed over; a missing file holds none.
func ReadJSONLines[T any](path string) ([]T, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []T
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var v T
		if err := json.Unmarshal(line, &v); err != nil {
			return nil, fmt.Errorf("%s:%d: %v", path, n, err)
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

// ModulePath reads the module path from repo/go.mod.
func ModulePath(repo string) (string, error) {
	b, err := os.ReadFile(repo + "/go.mod")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return f[1], nil
		}
	}
	return "", fmt.Errorf("%s/go.mod: no module line", repo)
}
