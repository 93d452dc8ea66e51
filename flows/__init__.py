"""One module per lifecycle: @flow functions that compose tasks. No client code here."""
