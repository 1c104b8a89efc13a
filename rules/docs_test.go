package rules

import (
	"os"
	"strings"
	"testing"
)

// yamlBlocks is every ```yaml block of a Markdown file.
func yamlBlocks(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, part := range strings.Split(string(b), "```yaml\n")[1:] {
		end := strings.Index(part, "```")
		if end < 0 {
			t.Fatalf("%s: unterminated yaml block", path)
		}
		out = append(out, part[:end])
	}
	return out
}

// TestDocs: the first example of docs/rules.md is the one the tests use,
// every file it shows parses, and every fragment parses as a rule.
func TestDocs(t *testing.T) {
	blocks := yamlBlocks(t, "../docs/rules.md")
	if len(blocks) == 0 || blocks[0] != docExample {
		t.Fatalf("docs/rules.md's first example is not docExample:\n%s", blocks[0])
	}
	for _, b := range blocks {
		if strings.HasPrefix(b, "rules:") || strings.HasPrefix(b, "scan:") {
			if _, err := Parse([]byte(b), "docs/rules.md"); err != nil {
				t.Errorf("%v\n%s", err, b)
			}
			continue
		}
		// A matcher: each item at column 0 is one rule's matcher.
		var items []string
		for _, l := range strings.SplitAfter(b, "\n") {
			if l == "" {
				continue
			}
			if !strings.HasPrefix(l, " ") || len(items) == 0 {
				items = append(items, "")
			}
			items[len(items)-1] += "    " + l
		}
		for _, it := range items {
			text := "rules:\n  - name: r\n    severity: low\n" + it
			if _, err := Parse([]byte(text), "docs/rules.md"); err != nil {
				t.Errorf("%v\n%s", err, text)
			}
		}
	}
}

func TestExample(t *testing.T) {
	s, err := Load("../examples/rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Rules) < 10 || s.Scan == nil || s.Scan.Interval == nil || s.Rules[0].Name != "no miners" {
		t.Errorf("examples/rules.yaml: %d rules, scan %+v", len(s.Rules), s.Scan)
	}
	seen := map[string]bool{}
	for _, r := range s.Rules {
		seen[r.Matcher()] = true
	}
	for _, m := range []string{"process", "cred_change", "parent_change", "module", "integrity", "hidden"} {
		if !seen[m] {
			t.Errorf("examples/rules.yaml has no %s rule", m)
		}
	}
}
