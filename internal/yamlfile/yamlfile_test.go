package yamlfile

import (
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// A bad indent deep in a long file is found at its own line, not at the
// start of the block yaml.v3 names.
func TestSyntaxLine(t *testing.T) {
	var b strings.Builder
	b.WriteString("rules:\n")
	for range 3000 {
		b.WriteString("  - name: x\n    severity: low\n")
	}
	b.WriteString("  - name: y\n   severity: low\n") // line 6003: one space short
	data := []byte(b.String())
	var n yaml.Node
	err := yaml.Unmarshal(data, &n)
	if err == nil {
		t.Fatal("the file parsed")
	}
	line, msg := Split(err)
	if got := SyntaxLine(data, line, msg); got != 6003 {
		t.Errorf("line %d (yaml.v3 said %d: %s), want 6003", got, line, msg)
	}
}
