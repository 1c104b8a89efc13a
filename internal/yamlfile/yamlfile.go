// Package yamlfile holds what the policy and rule files share in reading
// YAML with gopkg.in/yaml.v3: errors turned into a line and a message a
// user can act on, and small node helpers.
package yamlfile

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	"gopkg.in/yaml.v3"
)

// Split splits yaml.v3's "yaml: line N: msg" (or a type error's first
// message) into N (0 when there is none) and msg.
func Split(err error) (int, string) {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) && len(te.Errors) > 0 {
		msg = te.Errors[0]
	}
	msg = strings.TrimPrefix(msg, "yaml: ")
	var line int
	if _, scanErr := fmt.Sscanf(msg, "line %d:", &line); scanErr == nil {
		if i := strings.Index(msg, ":"); i >= 0 {
			msg = strings.TrimSpace(msg[i+1:])
		}
	}
	return line, msg
}

// SyntaxLine finds the line of a syntax error in data that yaml.v3
// reported as msg at line. yaml.v3 reports the line where the enclosing
// block starts, not where the error is: the first line whose prefix of
// the file fails with the same message is the one that broke it.
// Prefixes that end before the fault parse, or fail otherwise (a flow
// collection or a quoted string cut in two); those past it fail with the
// message. The line is found by bisection (a few dozen parses, not one
// per line), then the lines just before it are tried in case a prefix
// failed with the message early.
func SyntaxLine(data []byte, line int, msg string) int {
	if line < 1 {
		line = 1
	}
	lines := bytes.SplitAfter(data, []byte("\n"))
	if len(lines) > 0 && len(lines[len(lines)-1]) == 0 {
		lines = lines[:len(lines)-1]
	}
	ends := make([]int, len(lines)) // ends[i]: the length of lines[:i+1]
	n := 0
	for i, l := range lines {
		n += len(l)
		ends[i] = n
	}
	same := func(i int) bool {
		var node yaml.Node
		err := yaml.Unmarshal(data[:ends[i]], &node)
		if err == nil {
			return false
		}
		_, m := Split(err)
		return m == msg
	}
	lo, hi := min(line-1, len(lines)), len(lines)-1
	if lo > hi {
		return line
	}
	// The smallest i in [lo, hi] with same(i); hi fails (the file).
	for lo < hi {
		mid := lo + (hi-lo)/2
		if same(mid) {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	found := lo
	for i := max(line-1, found-20); i < found; i++ {
		if same(i) {
			found = i
			break
		}
	}
	if same(found) {
		return found + 1
	}
	return line
}

// Hint adds what usually causes yaml.v3's terse indentation messages.
func Hint(msg string) string {
	for _, h := range []string{"expected '-' indicator", "did not find expected key", "mapping values are not allowed"} {
		if strings.Contains(msg, h) {
			return msg + " (check the indentation)"
		}
	}
	return msg
}

// Scalar is a scalar node's value, or "" for any other node.
func Scalar(n *yaml.Node) string {
	if n.Kind != yaml.ScalarNode {
		return ""
	}
	return n.Value
}

// ErrOr is err's text, or s when err is nil (an unknown value: what to
// want instead).
func ErrOr(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}
